"""Memory that follows the served model: what a reload leaves behind goes back to the system.

A reload loads a whole model beside the old one, then drops the old one. Two things kept it resident,
measured with `centra soak` (3 minutes of traffic, re-merges, corrupt publishes and SIGHUPs on a
MiniLM model: RSS 880 MB after warm-up, peak 1,977 MB, 1,153 MB at the end): refused calls leave
reference cycles (an exception, its traceback, the frame that checked the call against the engine of the
moment) that pin old engines until a full collection, which a server allocating few Python objects
rarely runs; and freed weights stay in the allocator's heaps. A collection after each reload capped the
peak (999 MB) and glibc's `malloc_trim` handed the heaps' free pages back (492 MB after warm-up, peak
855, end 497). Elsewhere than glibc the trim does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_memory() -> None:
    """Collect garbage (a dropped model pinned by cycles) and hand free heap memory back (glibc)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
