"""Large temporaries from a kept heap in Dask worker processes (glibc only).

``distributed`` starts its worker processes with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed
memory goes back to the system. Setting a malloc threshold by environment also turns off
glibc's adaptive ``mmap`` threshold, so every array above 128 KiB is then a fresh ``mmap``
that is zeroed page by page on first touch and unmapped on free: slab tasks, which make tens
of temporaries of several MB each, spent most of their time in page faults (about 4x slower in
a worker than in a plain process). :func:`keep_heap` raises both thresholds once per process:
slab-sized temporaries are then reused from the heap, and what the process holds stays
bounded by the largest slab's working set (the slab tasks' memory does not grow with the
series).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20  # above this an allocation is its own mapping (returned when freed)
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top for reuse


@functools.cache
def keep_heap() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); False where not glibc.

    >>> isinstance(keep_heap(), bool)
    True
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
