"""Put the module folder on sys.path so `import thinseg` works without installing the package."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))
