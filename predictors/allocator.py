"""glibc's allocator kept from handing each ranking's memory back to the kernel.

A ranking allocates a few megabytes of temporaries ([candidates, history] similarity and
attention matrices, the gathered vectors) and frees them when it answers. glibc serves blocks
above its mmap threshold (dynamic, starting at 128 KiB) with fresh `mmap`s and trims freed memory
at the top of its heaps back to the kernel, so the next ranking page-faults its temporaries in
again and the kernel zeroes every page: about 550 minor page faults per answer at 200
candidates × 1,000 behaviours in `bench/ranking_latency.py`, none with this (docs/benchmarks.md,
"KServe's own floor, and the allocator lever"). `keep_freed_memory` raises both thresholds once
at start, so freed blocks stay in the process and are reused; the resident set then holds the
peak of the rankings in flight.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("mmrank.predictor")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit: larger values are refused


def keep_freed_memory(limit_mib: int) -> bool:
    """Blocks up to 32 MiB come from the heap and up to `limit_mib` MiB of freed memory stays in
    the process (0: glibc's defaults, nothing changed). False where the C library is not glibc
    or refused the setting: the process then runs with its defaults, only slower."""
    if limit_mib <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("allocator: the C library has no mallopt (not glibc); its defaults stay")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    limit = min(limit_mib, 1 << 10) << 20
    kept = bool(mallopt(M_MMAP_THRESHOLD, min(limit, MMAP_THRESHOLD_MAX))) and bool(mallopt(M_TRIM_THRESHOLD, limit))
    log.info(
        "allocator: %s",
        f"blocks to {min(limit, MMAP_THRESHOLD_MAX) >> 20} MiB from the heap, freed memory kept to {limit_mib} MiB"
        if kept
        else "mallopt refused the thresholds; glibc's defaults stay",
    )
    return kept
