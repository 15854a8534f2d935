"""Freed memory kept for reuse rather than handed back to the kernel at once (glibc).

glibc serves each allocation over 128 KB (a threshold it raises, up to 32 MB, only as such
blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``. Every job's image (230-350
KB of pixels) and every batch's tensors (megabytes) then cost page faults, each page zeroed by
the kernel anew. With the thresholds below, blocks up to 64 MB come from the heap and are
reused. Measured with the CPU proxy (``python -m lookalike.bench.matrix cpu``, 2-core AMD EPYC):
a worker's system time per job went from 0.39-0.67 ms to 0.07-0.11, the API's from 0.20-0.26
to 0.10-0.16. A process keeps at most its peak use of such blocks, plus 256 MB before it trims.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024
# glibc's own variables for the same; a process started with either keeps what it says
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raise this process's thresholds; False where nothing changed (not glibc, or the
    environment sets them)."""
    if any(name in os.environ for name in ENVIRONMENT):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):  # no mallopt: not glibc (macOS, Windows)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap: int = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim: int = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return mmap == 1 and trim == 1
