"""Keep freed memory in the process instead of handing it back to the system after every step.

glibc serves each large allocation (a network's activations and gradients: tens of megabytes
each) with its own `mmap` and unmaps it when the tensor is freed, so every training step faults
in millions of fresh, zero-filled pages for tensors of exactly the sizes it has just freed. On a
2-core CPU that is about a tenth of a training step's time spent in the kernel. Told to keep
freed blocks in its heap (`mallopt`, glibc's own documented switch; the same as the
`MALLOC_MMAP_MAX_` and `MALLOC_TRIM_THRESHOLD_` environment variables), the allocator hands the
next step the same pages again.

The price is that memory freed is not returned before the process ends, so this is only for
processes that run one job and exit (the command line, which Slicer also starts for training),
never for a host such as Slicer itself. Elsewhere than glibc (macOS, Windows, musl) it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Free space at the heap's top that glibc keeps before trimming: the largest value mallopt takes
#: (an int), about 2 GiB, more than a training step frees at once.
TRIM_THRESHOLD_BYTES = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (no per-block `mmap`, no trimming of the
    heap) for the rest of the process; True where that was done, False where the C library is
    not glibc or refused."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
