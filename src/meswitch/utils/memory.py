"""Process memory: keep the C heap from holding on to freed tensor memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of at least ``threshold`` bytes with its own ``mmap`` (glibc only).

    glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed and then serves
    blocks of that size from the heap, where freed activations fragment it: the process keeps
    hundreds of MB it no longer uses (measured on the gradient pass of one expert: +0.49 GB peak over
    the resident models, +0.18 GB with this; docs/compression.md). Fixing the threshold returns each
    large tensor's pages when it is freed, for a page fault per page on the next allocation. Applies
    to the whole process: meant for a command's entry point. Returns whether the setting took.
    """
    libc = _libc()
    try:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) if libc else False
    except AttributeError:  # not glibc (musl has no mallopt)
        return False


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``); whether any were.

    Many small tensors freed together (a ladder of encodings once one rung per matrix is chosen:
    ~0.2 GB of the full zoo's expert) leave free pages inside the heap that it keeps otherwise. Cheap
    (milliseconds); call it after such a phase. A no-op elsewhere than glibc.
    """
    libc = _libc()
    try:
        return bool(libc.malloc_trim(0)) if libc else False
    except AttributeError:
        return False
