"""Give the heap back to the operating system after a backlog has drained.

A broker outage fills the spool's in-memory window, buffers and the publisher's batches; once
the backlog has drained, Python frees those objects, but glibc's malloc keeps the freed arenas
for reuse, so the process's RSS stays at its high-water mark for good (the chaos soak of
issue 14 measured it: ``gc.collect()`` plus ``malloc_trim(0)`` gives it back). The bridge calls
:func:`release_memory` once at the end of each drain: a few milliseconds, rarely.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

__all__ = ["release_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], object] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], object] | None = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:  # not glibc, or no C library found: nothing to trim
        return None
    return trim


def release_memory() -> bool:
    """Collect garbage and return free heap pages to the OS; True when malloc_trim was available."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
