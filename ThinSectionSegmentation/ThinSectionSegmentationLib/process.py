"""Long work in a separate process: command lines, output parsing and cancel (no Qt).

The panel runs the `thinseg` command (and, for registration and training, the core's job
runner `python -m thinseg.jobs`) with Slicer's own Python, so the GUI never freezes. Everything
but the Qt timer that polls lives here and is tested with real processes:

- `segment_command` / `worker_command`: the argument lists (`thinseg` importable through
  PYTHONPATH, see `process_environment`);
- `OutputParser`: turns stderr/stdout text (tqdm bars written with carriage returns, "epoch"
  summaries, "thinseg: error: ..." lines, the job runner's "@thinseg {json}" events) into events;
- `BackgroundProcess`: subprocess.Popen with reader threads, non-blocking `poll()`, `cancel()`
  (Ctrl-C first so the core removes partial files, then kill), and the core's error message.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.jobs import EVENT_PREFIX

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
    output, progress bars refreshed at most twice a second."""
    env = dict(_base_environment() if base is None else base)
    paths = [str(MODULE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env.setdefault("TQDM_MININTERVAL", "0.5")
    return env


def segment_command(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    model_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    probabilities: bool = False,
    pp_pattern: str = "PP",
    xp_pattern: str = "XP",
    overwrite: bool = True,
    python: str | None = None,
    extra: Iterable[str] = (),
) -> list[str]:
    """`python -m thinseg segment INPUT... --output OUT ...` as an argument list."""
    if not inputs:
        raise ValueError("segment_command needs at least one input")
    cmd = [python or python_executable(), "-m", "thinseg", "segment", *[str(p) for p in inputs]]
    cmd += ["--output", str(output), "--device", device, "--pp-pattern", pp_pattern, "--xp-pattern", xp_pattern]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    if probabilities:
        cmd.append("--probabilities")
    if overwrite:
        cmd.append("--overwrite")
    return cmd + [str(e) for e in extra]


def worker_command(task: str, job_file: str | os.PathLike[str], python: str | None = None) -> list[str]:
    """`python -m thinseg.jobs TASK JOB.json` (registration and training jobs) as an argument list."""
    if task not in ("register", "train"):
        raise ValueError(f"unknown worker task {task!r}")
    return [python or python_executable(), "-m", "thinseg.jobs", task, str(job_file)]


# -- parsing ------------------------------------------------------------------------------------


@dataclass
class Progress:
    """A progress-bar update: `done` of `total` steps of `name` (tiles of a section, batches of
    an epoch); `fraction` overall in 0..1 (epochs counted in for training)."""

    name: str
    done: int
    total: int
    fraction: float
    rate: str = ""
    epoch: int | None = None
    epochs: int | None = None


@dataclass
class Epoch:
    """A finished training epoch (one point of the live curve)."""

    epoch: int
    epochs: int
    loss: float
    val_mean_iou: float | None = None
    best: bool = False


@dataclass
class Message:
    text: str


@dataclass
class ErrorLine:
    """A one-line error from the core ("thinseg: error: ...")."""

    text: str


@dataclass
class Event:
    """A structured event from the job runner ("@thinseg {...}")."""

    kind: str
    data: dict = field(default_factory=dict)


_TQDM = re.compile(
    r"^(?:(?P<name>.*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)\s*(?:\[(?P<info>[^\]]*)\]?)?"
)
_EPOCH_NAME = re.compile(r"epoch\s+(?P<epoch>\d+)\s*/\s*(?P<epochs>\d+)", re.IGNORECASE)
_EPOCH_SUMMARY = re.compile(
    r"^epoch\s+(?P<epoch>\d+)\s*/\s*(?P<epochs>\d+):\s*loss\s+(?P<loss>[-+0-9.eE]+|nan)"
    r"(?:.*?val mean IoU\s+(?P<iou>[-+0-9.eE]+|nan))?(?P<rest>.*)$"
)
_ERROR = re.compile(r"^thinseg:\s*error:\s*(?P<text>.*)$")
_MPIX = re.compile(r"(?P<rate>[0-9.]+\s*MPix/s)")


def parse_line(line: str):
    """One line (or carriage-return segment) of output -> an event, or None for blank lines."""
    text = line.strip()
    if not text:
        return None
    if text.startswith(EVENT_PREFIX.strip()):
        try:
            data = json.loads(text[len(EVENT_PREFIX.strip()) :].strip())
            return Event(str(data.pop("event", "message")), data)
        except ValueError:
            return Message(text)
    m = _ERROR.match(text)
    if m:
        return ErrorLine(m.group("text").strip())
    m = _TQDM.match(text)
    if m:
        name = (m.group("name") or "").strip()
        done, total = int(m.group("done")), int(m.group("total"))
        fraction = done / total if total else 0.0
        info = m.group("info") or ""
        rate = _MPIX.search(info)
        progress = Progress(name, done, total, fraction, rate.group("rate") if rate else "")
        e = _EPOCH_NAME.search(name)
        if e:
            progress.epoch, progress.epochs = int(e.group("epoch")), int(e.group("epochs"))
            if progress.epochs:
                progress.fraction = (progress.epoch - 1 + fraction) / progress.epochs
        return progress
    m = _EPOCH_SUMMARY.match(text)
    if m:
        iou = m.group("iou")
        return Epoch(
            int(m.group("epoch")),
            int(m.group("epochs")),
            float(m.group("loss")),
            float(iou) if iou is not None else None,
            "best" in (m.group("rest") or ""),
        )
    return Message(text)


class OutputParser:
    """Feed it chunks as they arrive; it returns the events of every complete line.

    tqdm redraws its bar with "\\r" and no newline, so both "\\r" and "\\n" end a line; a
    partial line is kept until the rest arrives (or `flush()`)."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> list:
        data = self._partial + text
        parts = re.split(r"\r\n|\r|\n", data)
        self._partial = parts.pop()
        return [e for e in (parse_line(p) for p in parts) if e is not None]

    def flush(self) -> list:
        rest, self._partial = self._partial, ""
        event = parse_line(rest)
        return [event] if event is not None else []


# -- running ------------------------------------------------------------------------------------


def _default_sigint() -> None:
    """In the forked child before exec: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class BackgroundProcess:
    """A child process whose stdout and stderr are parsed as they arrive.

    `poll()` never blocks: it returns the events received since the last call. `finished`
    turns True once the process has exited and both pipes are drained. `cancel()` asks the
    child to stop (SIGINT: the core discards partial files), then kills it after `grace` s.
    """

    def __init__(
        self, command: Sequence[str], env: dict | None = None, cwd: str | os.PathLike[str] | None = None
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = process_environment() if env is None else env
        self.cwd = str(cwd) if cwd is not None else None
        self.returncode: int | None = None
        self.cancelled = False
        self._kill_at = 0.0
        self.errors: list[str] = []
        self.messages: list[str] = []
        self.log: list[str] = []  # every line, for the Slicer log
        self._queue: queue.Queue = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._parsers = {"stdout": OutputParser(), "stderr": OutputParser()}

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

    def poll(self) -> list:
        """Events since the last call; sets `returncode` once the child is done and drained."""
        events = []
        while True:
            try:
                name, text = self._queue.get_nowait()
            except queue.Empty:
                break
            parser = self._parsers[name]
            new = parser.feed(text) if text is not None else parser.flush()
            for event in new:
                self._record(event)
            events += new
        self._kill_if_overdue()
        if (
            self._process is not None
            and self.returncode is None
            and self._process.poll() is not None
            and all(not t.is_alive() for t in self._threads)
            and self._queue.empty()
        ):
            self.returncode = self._process.returncode
        return events

    def _record(self, event) -> None:
        if isinstance(event, ErrorLine):
            self.errors.append(event.text)
            self.log.append(f"thinseg: error: {event.text}")
        elif isinstance(event, Message):
            self.messages.append(event.text)
            self.log.append(event.text)
        elif isinstance(event, Epoch):
            self.log.append(
                f"epoch {event.epoch}/{event.epochs}: loss {event.loss:.4f}"
                + (f", val mean IoU {event.val_mean_iou:.4f}" if event.val_mean_iou is not None else "")
            )
        elif isinstance(event, Event) and event.kind == "error":
            self.errors.append(str(event.data.get("message", "")))
            self.log.append(f"error: {event.data.get('message', '')}")

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list:
        """Block until done (tests and console use); returns every event received meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events = []
        while True:
            events += self.poll()
            if self.finished:
                return events
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(self.command[:4])} did not finish within {timeout} s")
            time.sleep(interval)

    def cancel(self, grace: float = 5.0, wait: bool = True) -> None:
        """Stop the child: interrupt it (the core then removes its partial files), and kill it
        if it is still running `grace` seconds later. With wait=False this returns at once and
        `poll()` does the kill when the time is up (the GUI never blocks). Safe to call twice."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        if not self.cancelled:
            self.cancelled = True
            self._kill_at = time.monotonic() + grace
            try:
                if os.name == "nt":
                    process.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
                else:
                    os.killpg(process.pid, signal.SIGINT)
            except OSError:
                pass
        if wait:
            try:
                process.wait(timeout=max(0.0, self._kill_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill()
                process.wait()

    def _kill(self) -> None:
        """Kill the whole process group (the launcher and its Python)."""
        process = self._process
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True, check=False)
            else:
                os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()

    def _kill_if_overdue(self) -> None:
        process = self._process
        if self.cancelled and process is not None and process.poll() is None and time.monotonic() > self._kill_at:
            self._kill()

    # results
    def error_message(self) -> str:
        """What went wrong, in the core's words: its error lines, else the last output lines."""
        if self.cancelled:
            return "cancelled"
        if self.errors:
            unique = list(dict.fromkeys(self.errors))
            return "\n".join(unique[-5:])
        tail = [line for line in self.log if line.strip()][-5:]
        detail = "\n".join(tail) if tail else "no output"
        return f"the process stopped with exit status {self.returncode}:\n{detail}"

    def check(self) -> None:
        """Raise ThinSegError unless the process finished with exit status 0."""
        if self.cancelled:
            raise ThinSegError("cancelled")
        if self.returncode != 0:
            raise ThinSegError(self.error_message())
