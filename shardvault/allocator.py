"""glibc's allocator, set for the data path's buffers at the command's start (issue 11).

A backup or restore allocates buffers of a few MiB (chunks, sealed blobs,
shards) to 32 MiB and more (packs) many times a second, on several
threads.  glibc's defaults serve these badly: a buffer over its mmap
threshold (dynamic, at most 32 MiB) is a fresh mapping, and every thread
gets its own arena whose heap is returned to the system as soon as its top
is free; either way the next buffer's pages are faulted in one at a time
(4 KiB each).  A first backup of 600 MiB took ~220,000 page faults, about
a quarter of its system time.  With one arena, buffers under 64 MiB from
the heap and a trim threshold above a few packs, freed buffers are reused:
~80,000 faults, ~0.2 s less of 2.2 s, and a lower peak RSS (one arena, not
one per thread; BENCHMARKS.md, fourth session).  Most allocations already
happen under the GIL, so one arena costs no parallelism.

glibc's own settings (``MALLOC_ARENA_MAX`` and the like, or
``GLIBC_TUNABLES``) win over these values; on another C library (musl has
no ``mallopt``) nothing changes.  Only the command line calls this: it owns
its process, a library caller owns theirs.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from typing import NamedTuple

MIB = 1 << 20


class Setting(NamedTuple):
    param: int  # mallopt(3)'s number
    values: tuple[int, ...]  # tried in order: an older glibc refuses an mmap threshold over 32 MiB
    variable: str  # glibc's environment variable for it
    tunable: str  # and its name in GLIBC_TUNABLES


SETTINGS = (
    # M_ARENA_MAX: every thread allocates from the main arena.
    Setting(-8, (1,), "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
    # M_MMAP_THRESHOLD: packs (32 MiB and some) come from the heap.
    Setting(-3, (64 * MIB, 32 * MIB), "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
    # M_TRIM_THRESHOLD: keep a few packs' worth when they are freed.
    Setting(-1, (128 * MIB,), "MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold"),
)


def tune(environ: Mapping[str, str] = os.environ) -> list[int]:
    """Apply the :data:`SETTINGS` that the environment leaves alone; return the parameters applied."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    tunables = environ.get("GLIBC_TUNABLES", "")
    applied = []
    for setting in SETTINGS:
        if setting.variable in environ or f"{setting.tunable}=" in tunables:
            continue
        if any(mallopt(setting.param, value) == 1 for value in setting.values):  # 1: taken
            applied.append(setting.param)
    return applied
