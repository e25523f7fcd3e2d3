"""Training processes keep freed memory for reuse (thinseg.allocator); nothing else does.

Measured from outside, in fresh interpreters: after the entry point has run, a 64 MB block is
taken from malloc, written and freed ten times, and the page faults of those blocks are counted. glibc's
default maps and unmaps each one (16,384 faults a time with 4 KiB pages); a process that keeps freed memory
reuses the pages of the first.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MODULE_DIR

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

#: Sets up as HOW says (nothing; the allocator call; MODULE's main() as the process's command line
#: ARGV, or called with ARGV from inside), then counts the page faults of ten 64 MB blocks from
#: malloc, each written and freed.
PROBE = """
import ctypes, ctypes.util, importlib, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch_and_free(size=2**26):
    block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
how, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
if how == "allocator":
    from thinseg.allocator import retain_freed_memory
    assert retain_freed_memory()
elif how == "process":
    sys.argv = ["probe", *argv]
    importlib.import_module(module).main()  # fails on the missing input: only its set-up counts
elif how == "call":
    importlib.import_module(module).main(argv)
touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch_and_free()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(how: str, module: str = "", *argv: object) -> int:
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", PROBE, how, module, *map(str, argv)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_faults() -> int:
    """glibc's default: every block is mapped afresh, each of its pages faulted in (10 x 16,384
    4 KiB pages; fewer where the kernel backs them with huge pages)."""
    faults = page_faults("nothing")
    assert faults >= 10 * 2**26 // (2 * 2**20)  # at least one fault per 2 MiB page of every block
    return faults


def retained(faults: int, default: int) -> bool:
    return faults < 0.05 * default


def test_retained_memory_serves_the_next_blocks_without_faults(default_faults: int):
    assert retained(page_faults("allocator"), default_faults)


def test_the_train_command_keeps_freed_memory_and_segment_does_not(tmp_path: Path, default_faults: int):
    missing = tmp_path / "missing.nc"
    assert retained(
        page_faults("process", "thinseg.cli.main", "train", missing, "-o", tmp_path / "run"), default_faults
    )
    assert not retained(
        page_faults("process", "thinseg.cli.main", "segment", missing, "-o", tmp_path / "seg"), default_faults
    )


def test_the_train_job_keeps_freed_memory_and_the_segment_job_does_not(tmp_path: Path, default_faults: int):
    missing = tmp_path / "job.json"
    assert retained(page_faults("process", "thinseg.jobs.__main__", "train", missing), default_faults)
    assert not retained(page_faults("process", "thinseg.jobs.__main__", "segment", missing), default_faults)


def test_in_process_calls_leave_the_host_process_alone(tmp_path: Path, default_faults: int):
    """Slicer's console and tests call main(argv) inside their own process: it must stay as it was."""
    cli = ("thinseg.cli.main", "train", tmp_path / "missing.nc", "-o", tmp_path / "run")
    assert not retained(page_faults("call", *cli), default_faults)
    assert not retained(page_faults("call", "thinseg.jobs.__main__", "train", tmp_path / "job.json"), default_faults)
