"""`thinseg` entry point: sub-commands, one-line errors, exit codes.

Exit codes: 0 success, 1 some inputs failed (the rest were processed), 2 bad usage or a
problem that stopped everything, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Every
failure is one `thinseg: error:` line; THINSEG_DEBUG=1 prints the traceback too.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from thinseg import __version__
from thinseg.allocator import retain_freed_memory
from thinseg.cli import (
    analyze_cmd,
    compare_cmd,
    evaluate_cmd,
    prepare_cmd,
    register_cmd,
    segment_cmd,
    stitch_cmd,
    train_cmd,
)
from thinseg.cli.options import CommandParser
from thinseg.console import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Terminated,
    interrupt_exit_code,
    printable_output,
    sigterm_as_interrupt,
)
from thinseg.errors import ThinSegError, debugging
from thinseg.io.atomic import removed_on_failure
from thinseg.io.netcdf import end_process_if_files_left_open
from thinseg.limits import section_pixel_limit

EXIT_OK, EXIT_PARTIAL, EXIT_ERROR = 0, 1, 2
__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARTIAL", "EXIT_TERMINATED", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `thinseg` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="thinseg",
        description="Thin-section (PP/XP) mineral segmentation, GeoSlicer-compatible.",
    )
    parser.add_argument("--version", action="version", version=f"thinseg {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for module in (
        segment_cmd,
        register_cmd,
        prepare_cmd,
        train_cmd,
        evaluate_cmd,
        compare_cmd,
        analyze_cmd,
        stitch_cmd,
    ):
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
    """Run the command line `argv` (default: sys.argv); returns the exit code. SIGTERM stops it
    as Ctrl-C does, and printing a file name never fails, for the duration of the call. Run as
    the process's command line (no `argv`), it ends the process itself where HDF5 could not
    close a file (`end_process_if_files_left_open`), and a command that asks for it keeps freed
    memory for reuse (`thinseg.allocator`), which only a process of its own may do."""
    with printable_output(), sigterm_as_interrupt():
        code = _main(argv, own_process=argv is None)
    if argv is None:
        end_process_if_files_left_open(code)
    return code


def _main(argv: Sequence[str] | None, own_process: bool = False) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if own_process and getattr(args, "retain_freed_memory", False):
        retain_freed_memory()
    args.command_line = list(sys.argv[1:] if argv is None else argv)  # as typed, for commands that start copies
    keep = getattr(args, "keep_output", None)
    try:
        with section_pixel_limit(getattr(args, "max_pixels", None)):
            folder = output_folder(args)
            with removed_on_failure(folder, keep=None if keep is None else lambda: bool(keep(args))) as failed:
                code = int(args.run(args) or EXIT_OK)
                if code >= EXIT_ERROR:
                    failed()
        return code
    except KeyboardInterrupt as interrupt:
        stopped = "terminated" if isinstance(interrupt, Terminated) else "interrupted"
        print(f"thinseg: {stopped}; no partial output was kept", file=sys.stderr)
        return interrupt_exit_code(interrupt)
    except Exception as error:  # one line for every failure; outputs are atomic, so none is partial
        return report_failure(error, output_folder(args))


def report_failure(error: Exception, output: Path | None = None) -> int:
    """Print `error` as one `thinseg: error:` line (after its traceback with THINSEG_DEBUG=1); a
    system error that names no file was writing into `output`."""
    if debugging():
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    where = output if isinstance(error, OSError) else None
    print(f"thinseg: error: {ThinSegError.from_exception(error, where)}", file=sys.stderr, flush=True)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
