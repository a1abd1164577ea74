"""glibc malloc tuning for streaming merges.

torch allocates each temporary tensor with malloc. Chunk-sized temporaries (a few MB) are above glibc's mmap
threshold, so every op maps fresh pages and unmaps them again: page faults then cost more than the arithmetic.
Raising the mmap and trim thresholds lets the heap reuse those pages; peak memory is unchanged (the engine's
working set is bounded by the chunk size), only returned to the OS later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 512 * 1024 * 1024


@cache
def tune_allocator() -> bool:
    """Apply once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
