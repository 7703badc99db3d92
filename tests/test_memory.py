"""Process memory settings."""

import platform
import sys

import pytest
import torch

from meswitch.utils.memory import map_large_allocations, trim_heap

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def rss_anon() -> int:
    """Bytes of this process's anonymous resident memory (Linux)."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_large_allocations_are_mapped_and_still_work():
    assert map_large_allocations(1 << 20)
    x = torch.ones(1 << 20)  # 4 MiB: its own mapping now
    assert float(x.sum()) == 1 << 20


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_trim_heap_returns_the_free_pages_between_live_small_tensors():
    small = [torch.ones(8192) for _ in range(4096)]  # 32 KiB each, 128 MiB: served from the heap
    keep = small[::16]  # every 16th stays alive, so the heap cannot just shrink from its top
    del small
    before = rss_anon()
    assert trim_heap()
    freed = before - rss_anon()
    assert freed > 64 * 2**20, f"only {freed / 2**20:.0f} MiB went back to the OS"
    assert all(float(t.sum()) == 8192 for t in keep)
