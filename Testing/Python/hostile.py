"""The hostile-input harness: run `thinseg` as a user would, in a fresh process, and check the
promises a failure must keep.

Every case of the fuzz suite (`test_hostile_*.py`) runs the real console entry point and asserts
its exit code, that stderr holds exactly one `thinseg: error:` line and no traceback, that nothing
was left behind (no temporary, no partial result, no new file where none was asked for) and,
where the point is a bomb, that the peak memory of the process stayed bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from helpers import MODULE_DIR

#: Run `thinseg` as `python -m thinseg` does, then write the process's peak resident memory
#: (VmHWM, in kB) to the file named by $THINSEG_TEST_PEAK_FILE. VmHWM belongs to the process's own
#: address space, so unlike ru_maxrss it does not inherit the size of the (large) test process
#: that forked it.
_MEASURED_MAIN = """
import atexit, os, runpy, sys

def _peak():
    with open("/proc/self/status") as status:
        kb = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["THINSEG_TEST_PEAK_FILE"], "w") as out:
        out.write(kb)

atexit.register(_peak)
sys.argv[0] = "thinseg"
runpy.run_module("thinseg", run_name="__main__", alter_sys=True)
"""

#: Peak resident memory of a `thinseg` process that imports torch and refuses its input at once
#: (about 400-500 MB on Linux with torch 2.x): a bomb that allocated its declared size would
#: need gigabytes.
REFUSAL_PEAK_MB = 1200


@dataclass
class Run:
    """One finished `thinseg` process."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("thinseg: error:")]

    def describe(self) -> str:
        return (
            f"thinseg {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def start(
    *args: object,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    max_file_bytes: int | None = None,
    stdout: object = subprocess.PIPE,
    stderr: object = subprocess.PIPE,
) -> subprocess.Popen:
    """Start `python -m thinseg ARGS` (to race two runs, or signal one). `max_file_bytes` caps
    the size of any file the process writes (RLIMIT_FSIZE): a write beyond it fails with EFBIG,
    as a full disk fails with ENOSPC, from the kernel and not from a mock."""
    environment = dict(os.environ)
    environment.update(env or {})
    environment["PYTHONPATH"] = str(MODULE_DIR) + os.pathsep + environment.get("PYTHONPATH", "")
    environment.setdefault("CUDA_VISIBLE_DEVICES", "")
    argv = [a if isinstance(a, (str, bytes)) else os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]

    def limit_file_size() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    command = (
        [sys.executable, "-c", _MEASURED_MAIN]
        if "THINSEG_TEST_PEAK_FILE" in environment
        else [sys.executable, "-m", "thinseg"]
    )
    return subprocess.Popen(
        [*command, *argv],
        cwd=cwd,
        env=environment,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=limit_file_size if max_file_bytes is not None else None,
    )


def thinseg(
    *args: object,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    max_file_bytes: int | None = None,
) -> Run:
    """`python -m thinseg ARGS` in a fresh interpreter, with its own peak memory (VmHWM; NaN when
    the process died before it could say)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch, "peak_kb")
        environment = {**(env or {}), "THINSEG_TEST_PEAK_FILE": str(peak_file)}
        process = start(*args, cwd=cwd, env=environment, max_file_bytes=max_file_bytes, stdout=out, stderr=err)
        argv = list(process.args[3:])
        try:
            _, status, usage = _wait4(process, timeout)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = [arg.decode("utf-8", "backslashreplace") if isinstance(arg, bytes) else arg for arg in argv]
        return Run(
            text,
            process.returncode,
            out.read().decode("utf-8", "backslashreplace"),
            err.read().decode("utf-8", "backslashreplace"),
            _peak_mb(peak_file),
        )


def _peak_mb(peak_file: Path) -> float:
    try:
        return int(peak_file.read_text()) / 1024.0
    except (OSError, ValueError):
        return float("nan")


def _wait4(process: subprocess.Popen, timeout: float):
    import time

    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(process.args, timeout)
        time.sleep(0.05)


def assert_refused(run: Run, *, code: int = 2, mentions: Iterable[str] = ()) -> str:
    """The run failed with `code`, one `thinseg: error:` line, no traceback; the line holds every
    text in `mentions` (a file name, the bound, the option). Returns the line."""
    assert run.returncode == code, run.describe()
    assert "Traceback" not in run.stderr, run.describe()
    lines = run.error_lines()
    assert len(lines) == 1, run.describe()
    for text in mentions:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}\n{run.describe()}"
    return lines[0]


def assert_batch_partial(run: Run, failed: Iterable[str]) -> list[str]:
    """A batch where some sections failed: exit 1, no traceback, each failed name listed once on
    stderr. Returns stderr's lines naming a failure."""
    assert run.returncode == 1, run.describe()
    assert "Traceback" not in run.stderr, run.describe()
    for name in failed:
        assert name in run.stderr, f"{name!r} not reported\n{run.describe()}"
    return [line for line in run.stderr.splitlines() if line.strip()]


def snapshot(folder: Path) -> set[str]:
    """Every path under `folder` (relative), to compare before and after a run."""
    folder = Path(folder)
    if not folder.exists():
        return set()
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_nothing_left(folder: Path, before: set[str] | None = None) -> None:
    """No temporaries (hidden or *.partial) under `folder`, and no path that was not there
    `before` (None: the folder must not exist or be empty)."""
    now = snapshot(folder)
    temporaries = sorted(p for p in now if Path(p).name.startswith(".") or p.endswith(".partial"))
    assert not temporaries, f"temporaries left in {folder}: {temporaries}"
    new = sorted(now - (before or set()))
    assert not new, f"new files left in {folder}: {new}"
