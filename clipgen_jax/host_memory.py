"""How the process's C allocator treats the large blocks XLA:CPU allocates and frees on every call.

XLA:CPU allocates an executable's temporary buffers as one block per call (59 MB for a Shapes prior training step
at batch 16). glibc's malloc serves any block over its mmap threshold (32 MB at most) by mmap and returns it by
munmap, so every call faults its temporaries in afresh: 15,000 page faults and a quarter of the CPU time of that
step on a 2-core machine (16.5 against 21 steps/s with `keep_freed_memory`, benchmarks/prior_speed.py). The tools
call `keep_freed_memory` once at start; a library import changes nothing.

A block over 64 MB that a non-main thread allocates (the Shapes VQGAN step's 70 MB) is still mmapped per call: glibc
gives such a thread its own arena, whose heaps are at most 64 MB. M_ARENA_MAX=1 removes those faults too, but it
gained the VQGAN step nothing (7.6 against 7.4 steps/s) and cost the prior step 9%, so it is not set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest int: freed memory at the top of the heap is kept for the next call


def keep_freed_memory() -> bool:
    """With glibc: serve every block from malloc's heap (no mmap) and never trim the heap, so that freed
    temporaries are reused without page faults. The process's resident memory then stays near its peak, as with an
    accelerator's caching allocator (not measured on accelerator hosts). Returns whether the setting was applied
    (not where the C library has no mallopt)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt (not glibc)
        return False
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) == 1
    logger.debug("malloc keeps freed memory: %s", applied)
    return applied
