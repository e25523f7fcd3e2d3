"""Wall time and peak resident memory of a child process together with all its descendants
(Linux /proc), shared by the benchmarks that run a command and report what the machine had to hold."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Linux /proc)."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        stack += [int(c) for c in children]
    return total


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time from start to exit
    peak_bytes: int  # largest sampled sum of resident memory over the process tree

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def run_measured(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None, interval: float = 0.02
) -> Measured:
    """Run `argv`, sampling the tree's resident memory every `interval` seconds (output is
    collected in temporary files, so a chatty child never blocks on a full pipe)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=None if env is None else dict(env), cwd=cwd)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(interval)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Measured(
            proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), seconds, peak
        )
