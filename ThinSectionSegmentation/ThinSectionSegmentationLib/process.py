"""Long work in a separate process: the command line, its typed events, cancel (no Qt).

The panel runs the core's job runner `python -m thinseg.jobs TASK job.json` with Slicer's own
Python, so the GUI never freezes. Everything but the Qt timer that polls lives here and is
tested with real processes:

- `worker_command`: the argument list (`thinseg` importable through PYTHONPATH, see
  `process_environment`);
- `BackgroundProcess`: subprocess.Popen with reader threads, a non-blocking `poll()` that
  returns the job's typed events (thinseg.jobs.events) and its other output as plain
  `OutputLine`s for the log, `cancel()` (Ctrl-C first so the core removes partial files, then
  SIGTERM, then kill), and `check()`, which raises the job's error event message. Output text is never
  parsed: stderr is kept only to explain a process that died without an error event.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from thinseg.errors import ThinSegError
from thinseg.jobs import TASKS, ErrorEvent, EventError, JobEvent, ResultEvent, WarningEvent, parse_event

#: The module folder (holds `thinseg/` and `ThinSectionSegmentationLib/`).
MODULE_DIR = Path(__file__).resolve().parents[1]


# -- commands -----------------------------------------------------------------------------------


def _in_slicer() -> bool:
    return "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app")


def python_executable() -> str:
    """Slicer's Python: the `PythonSlicer` launcher when running inside Slicer (it sets up the
    library paths; found on PATH or next to the application), else this interpreter."""
    if _in_slicer():
        name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
        launcher = shutil.which("PythonSlicer") or next(
            (
                str(p)
                for p in (Path(sys.executable).parent / name, Path(sys.executable).parent.parent / "bin" / name)
                if p.is_file()
            ),
            None,
        )
        if launcher:
            return launcher
    return sys.executable


def _base_environment() -> dict:
    """The environment Slicer was started with (inside Slicer), else this process's."""
    if _in_slicer():
        try:
            return dict(sys.modules["slicer"].util.startupEnvironment())
        except Exception:
            pass
    return dict(os.environ)


def process_environment(base: dict | None = None) -> dict:
    """Environment for the child: `thinseg` importable from the module folder, unbuffered UTF-8
    output (events arrive as they are written)."""
    env = dict(_base_environment() if base is None else base)
    paths = [str(MODULE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def worker_command(task: str, job_file: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """`python -m thinseg.jobs TASK JOB.json` (segmentation, registration, training) as an argument list."""
    if task not in TASKS:
        raise ValueError(f"unknown worker task {task!r}")
    return [python or python_executable(), "-m", "thinseg.jobs", task, str(job_file)]


# -- output -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputLine:
    """A line of the process's output that is not an event (a library's warning, a traceback):
    for the log only."""

    stream: str  # "stdout" | "stderr"
    text: str


#: What `poll()` returns: the job's events and its other output lines, in arrival order per stream.
ProcessOutput = Union[JobEvent, OutputLine]

#: Lines of stderr kept to explain a crash.
STDERR_TAIL = 20
#: Seconds between the second request to stop (SIGTERM) and the kill: a run that did not stop
#: on Ctrl-C within `grace` is in one long native call (a forward pass, a file write) and stops at
#: its end. What a kill leaves (hidden `.partial` files) is removed by the next run into the folder.
TERM_GRACE = 10.0


class _Lines:
    """Splits text chunks into lines as they arrive (a partial line waits for its end)."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> list[str]:
        parts = re.split(r"\r\n|\r|\n", self._partial + text)
        self._partial = parts.pop()
        return parts

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, ""
        return [rest] if rest else []


# -- running ------------------------------------------------------------------------------------


def _default_sigint() -> None:
    """In the forked child before exec: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class BackgroundProcess:
    """A job process whose output is read as it arrives.

    `poll()` never blocks: it returns the events and output lines received since the last call.
    `finished` turns True once the process has exited and both pipes are drained. `cancel()`
    asks the child to stop (SIGINT: the core discards partial files), then kills it after
    `grace` s. `error` and `result` hold the job's error or result event once received.
    """

    def __init__(
        self, command: Sequence[str], env: dict | None = None, cwd: str | os.PathLike[str] | None = None
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = process_environment() if env is None else env
        self.cwd = str(cwd) if cwd is not None else None
        self.returncode: int | None = None
        self.cancelled = False
        self.error: ErrorEvent | None = None
        self.result: ResultEvent | None = None
        self.warnings: list[str] = []
        self.invalid_events: list[str] = []  # event lines that did not parse (a bug, kept for the message)
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL)
        self._term_at = 0.0
        self._kill_at = 0.0
        self._termed = False
        self._queue: queue.Queue = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._lines = {"stdout": _Lines(), "stderr": _Lines()}

    # lifecycle
    def start(self) -> BackgroundProcess:
        # Its own process group: cancel reaches the launcher (PythonSlicer) and the Python it runs.
        flags: dict = {}
        if os.name == "nt":
            flags["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            flags["start_new_session"] = True
            # SIGINT is how Cancel asks the child to stop. A parent started in the background by a
            # non-interactive shell (CI, nohup, some launchers) ignores SIGINT, and exec keeps that
            # disposition: Python then installs no KeyboardInterrupt handler and Cancel would be lost.
            flags["preexec_fn"] = _default_sigint
        try:
            self._process = subprocess.Popen(
                self.command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                **flags,
            )
        except OSError as error:
            raise ThinSegError(f"cannot start {self.command[0]}: {error.strerror or error}") from None
        for name, pipe in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            thread = threading.Thread(target=self._read, args=(name, pipe), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _read(self, name: str, pipe) -> None:
        decoder_buffer = b""
        while True:
            chunk = pipe.read1(4096) if hasattr(pipe, "read1") else pipe.read(4096)
            if not chunk:
                break
            decoder_buffer += chunk
            try:
                text = decoder_buffer.decode("utf-8")
                decoder_buffer = b""
            except UnicodeDecodeError as error:
                if error.start > 0 and len(decoder_buffer) - error.start < 4:  # split multi-byte char
                    text = decoder_buffer[: error.start].decode("utf-8")
                    decoder_buffer = decoder_buffer[error.start :]
                else:
                    text = decoder_buffer.decode("utf-8", errors="replace")
                    decoder_buffer = b""
            self._queue.put((name, text))
        if decoder_buffer:
            self._queue.put((name, decoder_buffer.decode("utf-8", errors="replace")))
        self._queue.put((name, None))
        pipe.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def poll(self) -> list[ProcessOutput]:
        """Events and output lines since the last call; sets `returncode` once the child is
        done and drained."""
        received: list[ProcessOutput] = []
        while True:
            try:
                name, text = self._queue.get_nowait()
            except queue.Empty:
                break
            lines = self._lines[name].feed(text) if text is not None else self._lines[name].flush()
            received += [item for item in (self._take(name, line) for line in lines) if item is not None]
        self._kill_if_overdue()
        if (
            self._process is not None
            and self.returncode is None
            and self._process.poll() is not None
            and all(not t.is_alive() for t in self._threads)
            and self._queue.empty()
        ):
            self.returncode = self._process.returncode
        return received

    def _take(self, stream: str, line: str) -> ProcessOutput | None:
        """One line -> its event (stdout event lines) or an output line; None for blank lines."""
        if not line.strip():
            return None
        if stream == "stderr":
            self.stderr_tail.append(line.rstrip())
            return OutputLine(stream, line.rstrip())
        try:
            event = parse_event(line)
        except EventError as error:
            self.invalid_events.append(f"{error}: {line.strip()[:200]}")
            return OutputLine(stream, line.rstrip())
        if event is None:
            return OutputLine(stream, line.rstrip())
        if isinstance(event, ErrorEvent):
            self.error = event
        elif isinstance(event, ResultEvent):
            self.result = event
        elif isinstance(event, WarningEvent):
            self.warnings.append(event.text)
        return event

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[ProcessOutput]:
        """Block until done (tests and console use); returns everything received meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        received: list[ProcessOutput] = []
        while True:
            received += self.poll()
            if self.finished:
                return received
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.command[:4])} did not finish within {timeout} s")
            time.sleep(interval)

    def cancel(self, grace: float = 5.0, wait: bool = True) -> None:
        """Stop the child: interrupt it (the core then removes its partial files); if it is
        still running `grace` seconds later, ask again with SIGTERM (which the core handles like
        Ctrl-C), and kill it `TERM_GRACE` seconds after that. With wait=False this returns at
        once and `poll()` sends the later signals when their time is up (the GUI never blocks).
        Safe to call twice."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        if not self.cancelled:
            self.cancelled = True
            self._term_at = time.monotonic() + grace
            self._kill_at = self._term_at + TERM_GRACE
            try:
                if os.name == "nt":
                    process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
                else:
                    os.killpg(process.pid, signal.SIGINT)
            except OSError:
                pass
        if wait:
            for deadline, step in ((self._term_at, self._terminate), (self._kill_at, self._kill)):
                try:
                    process.wait(timeout=max(0.0, deadline - time.monotonic()))
                    return
                except subprocess.TimeoutExpired:
                    step()
            process.wait()

    def _terminate(self) -> None:
        """The second request to stop: SIGTERM to the process group (POSIX; Windows has no
        gentle second signal, the kill follows)."""
        process = self._process
        if process is None or self._termed:
            return
        self._termed = True
        if os.name != "nt":
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGTERM)

    def _kill(self) -> None:
        """Kill the whole process group (the launcher and its Python)."""
        process = self._process
        if process is None:
            return
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
            else:
                os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()

    def _kill_if_overdue(self) -> None:
        process = self._process
        if not self.cancelled or process is None or process.poll() is not None:
            return
        now = time.monotonic()
        if now > self._kill_at:
            self._kill()
        elif now > self._term_at:
            self._terminate()

    # results
    def error_message(self) -> str:
        """What went wrong: the job's error event, else (a crash) the exit status and the last
        lines of stderr."""
        if self.cancelled:
            return "cancelled"
        if self.error is not None:
            return self.error.message
        code = self.returncode
        if code is not None and code < 0:
            status = f"the process was stopped by signal {-code}"
        elif code == 0:
            status = "the process finished without reporting a result"
        else:
            status = f"the process stopped with exit status {code}"
        detail = list(self.stderr_tail)[-5:] + self.invalid_events[-3:]
        return f"{status}:\n" + "\n".join(detail) if detail else f"{status} and wrote no error message"

    def check(self) -> ResultEvent:
        """The job's result event; ThinSegError (the job's message) unless it finished with
        exit status 0 and a result."""
        if self.cancelled:
            raise ThinSegError("cancelled")
        if self.returncode != 0 or self.result is None or self.error is not None:
            raise ThinSegError(self.error_message())
        return self.result
