"""Process memory settings."""

import platform
import sys

import pytest
import torch

from meswitch.utils.memory import map_large_allocations


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_large_allocations_are_mapped_and_still_work():
    assert map_large_allocations(1 << 20)
    x = torch.ones(1 << 20)  # 4 MiB: its own mapping now
    assert float(x.sum()) == 1 << 20
