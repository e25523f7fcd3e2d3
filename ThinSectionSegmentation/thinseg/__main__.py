"""`python -m thinseg` (how Slicer runs the CLI with its own Python)."""

import sys

from thinseg.cli.main import main

sys.exit(main())
