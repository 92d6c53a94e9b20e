"""Process-wide settings that make CPU training faster without changing any result.

The C allocator: glibc serves every allocation over 128 KiB-32 MiB (its adaptive mmap threshold) with a
fresh `mmap` and returns it with `munmap` when freed, so each training step's activations (gigabytes on a
135M model at batch 16 x 384 tokens) are page-faulted in and zeroed by the kernel again, step after step.
Measured on 2 cores, three reward-model steps: 38 s of 134 s of CPU time was kernel time; keeping freed
memory in the process (mmap threshold 1 GiB, no trimming) cut the step from 16.7 s to 14.9 s with the same
losses. Peak RSS is the same; the memory is simply not handed back between steps. `ALIGN_MALLOC_TUNE=0`
turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1


def tune_allocator() -> bool:
    """Keep freed memory in the process on glibc Linux; True when the settings took."""
    if os.environ.get("ALIGN_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("allocator tuning %s", "on" if done else "refused by the C library")
    return done
