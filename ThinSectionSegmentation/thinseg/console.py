"""How a thinseg process behaves in a console: SIGTERM stops it as Ctrl-C does, and printing
never fails on a file name that is not valid UTF-8.

Both front ends (the command line and the Slicer job process) wrap their run in
`sigterm_as_interrupt` and `printable_output`, so a `kill`, a service stopping or Slicer's Cancel
runs the same cleanup as Ctrl-C, and a name with odd bytes prints as \\xNN instead of
ending the run with a UnicodeEncodeError.
"""

from __future__ import annotations

import codecs
import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a service or session stopping the run), raised where Ctrl-C raises
    KeyboardInterrupt so that the same cleanup runs: temporaries and created folders removed,
    a training checkpoint kept."""

    def __init__(self, signum: int = int(signal.SIGTERM)) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT) and by SIGTERM (128 + SIGTERM), as shells report them.
EXIT_INTERRUPTED = 128 + int(signal.SIGINT)
EXIT_TERMINATED = 128 + int(signal.SIGTERM)


def interrupt_exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit status of a run stopped by `interrupt` (Ctrl-C or SIGTERM)."""
    return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not break off the cleanup
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (a KeyboardInterrupt) once, later ones are
    ignored while the cleanup runs; the previous handler comes back at exit. Only the main
    thread can take signals: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM wait; at its end they act as they would have. For
    the first import of C extensions (matplotlib's pybind11 modules): an interrupt raised while
    an extension initialises turns into an ImportError ("initialization failed") instead of a
    clean stop, and leaves the extension half made at exit. Main thread only, as signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        held.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


#: Encoding error handler that writes undecodable file-name bytes (surrogate escapes) as \xNN.
ESCAPE_ERRORS = "thinseg-escape"


def _escape(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    out = []
    for char in error.object[error.start : error.end]:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out), error.end


codecs.register_error(ESCAPE_ERRORS, _escape)


@contextlib.contextmanager
def printable_output() -> Iterator[None]:
    """Within the block printing to stdout/stderr never fails on a character the stream cannot
    encode: a file name's undecodable bytes print as \\xNN, other characters as \\uNNNN.
    The streams' previous error handling comes back at exit."""
    restore = []
    for stream in (sys.stdout, sys.stderr):
        reconfigure, errors = getattr(stream, "reconfigure", None), getattr(stream, "errors", None)
        if reconfigure is None or errors is None:
            continue
        try:
            reconfigure(errors=ESCAPE_ERRORS)
        except (ValueError, OSError):  # a closed or detached stream: leave it
            continue
        restore.append((reconfigure, errors))
    try:
        yield
    finally:
        for reconfigure, errors in restore:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors=errors)
