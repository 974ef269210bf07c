"""glibc's allocator, set for the data path's buffers at the command's start (issue 11).

A backup or restore allocates buffers of a few MiB (chunks, sealed blobs,
shards) to 32 MiB and more (packs) many times a second, on several
threads.  glibc's defaults serve these badly: a buffer over its mmap
threshold (dynamic, at most 32 MiB) is a fresh mapping, and every thread
gets its own arena whose heap is returned to the system as soon as its top
is free; either way the next buffer's pages are faulted in one at a time
(4 KiB each).  A first backup of 600 MiB took 230,000 page faults, about a
quarter of its system time.  With one arena, buffers under 64 MiB from the
heap and a trim threshold above a few packs, freed buffers are reused:
85,000 faults, ~0.2 s less of 2 s, and a lower peak RSS (one arena, not
one per thread; BENCHMARKS.md).  Most allocations already happen under the
GIL, so one arena costs no parallelism.

glibc's own environment variables (``MALLOC_ARENA_MAX`` and the like) win
over these values; on another C library (musl has no ``mallopt``) nothing
changes.  Only the command line calls this: it owns its process, a library
caller owns theirs.
"""

from __future__ import annotations

import ctypes
import os

MIB = 1 << 20
# mallopt(3) parameters: (number, value, the environment variable that overrides it).
SETTINGS = (
    (-8, 1, "MALLOC_ARENA_MAX"),  # M_ARENA_MAX: every thread allocates from the main arena
    (-3, 64 * MIB, "MALLOC_MMAP_THRESHOLD_"),  # M_MMAP_THRESHOLD: packs (32 MiB and some) come from the heap
    (-1, 128 * MIB, "MALLOC_TRIM_THRESHOLD_"),  # M_TRIM_THRESHOLD: keep a few packs' worth when freed
)


def tune(environ: os._Environ[str] | dict[str, str] = os.environ) -> list[int]:
    """Apply :data:`SETTINGS` that the environment does not set; return the parameters applied."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return [param for param, value, variable in SETTINGS if variable not in environ and mallopt(param, value) == 1]
