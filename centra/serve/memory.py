"""Memory that follows the served model: what a reload leaves behind goes back to the system.

A reload loads a whole model beside the old one, then drops the old one. Two things kept it resident,
measured with `centra soak` (3 minutes of traffic, re-merges, corrupt publishes and SIGHUPs on a
MiniLM model: RSS 880 MB after warm-up, peak 1,977 MB, 1,153 MB at the end): refused calls leave
reference cycles (an exception, its traceback, the frame that checked the call against the engine of the
moment) that pin old engines until a full collection, which a server allocating few Python objects
rarely runs; and freed weights stay in the allocator's heaps. A collection after each reload capped the
peak (999 MB) and glibc's `malloc_trim` handed the heaps' free pages back (492 MB after warm-up, peak
855, end 497).

Received messages: a 4 MB request refused by size once a second left the server 20 MB larger
(`centra bench-server --flood 1`): glibc raises its mmap threshold to the size of the first large block
freed, so later ones come from its heaps and stay. A fixed threshold (1 MiB) keeps every large block in
a mapping of its own, unmapped when freed: +0.6 MB (set first thing in `serve` and `bench-server`,
before torch and the model allocate). Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache  # loaded once: release_memory runs after every reload
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> bool:
    """Blocks of `size` bytes and more get mappings of their own for the life of the process (glibc; it
    also turns off glibc's moving threshold). True when set."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, size))


def release_memory() -> None:
    """Collect garbage (a dropped model pinned by cycles) and hand free heap memory back (glibc)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
