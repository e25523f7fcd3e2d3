"""`thinseg` entry point: sub-commands, one-line errors, exit codes.

Exit codes: 0 success, 1 some inputs failed (the rest were processed), 2 bad usage or a
problem that stopped everything, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from thinseg import __version__
from thinseg.cli import compare_cmd, evaluate_cmd, prepare_cmd, register_cmd, segment_cmd, train_cmd
from thinseg.errors import ThinSegError
from thinseg.io.atomic import removed_on_failure

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The `thinseg` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="thinseg",
        description="Thin-section (PP/XP) mineral segmentation, GeoSlicer-compatible.",
    )
    parser.add_argument("--version", action="version", version=f"thinseg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (segment_cmd, register_cmd, prepare_cmd, train_cmd, evaluate_cmd, compare_cmd):
        module.register(commands)
    return parser


def output_folder(args: argparse.Namespace) -> Path | None:
    """The folder a command writes into (for one .nc file, its folder): removed again if the
    command made it and then failed, so a failed run leaves nothing behind."""
    output = getattr(args, "output", None)
    if output is None:
        return None
    output = Path(output)
    return output.parent if output.suffix.lower() == ".nc" else output


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep = getattr(args, "keep_output", None)
    try:
        with removed_on_failure(output_folder(args), keep=None if keep is None else lambda: bool(keep(args))) as failed:
            code = int(args.run(args) or EXIT_OK)
            if code >= EXIT_ERROR:
                failed()
        return code
    except ThinSegError as error:
        print(f"thinseg: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a full disk or a vanished folder: outputs are written atomically, so none is partial
        print(f"thinseg: error: {ThinSegError.from_os_error(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("thinseg: interrupted; no partial output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
