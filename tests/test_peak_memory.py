"""Peak memory is measured per stretch: a block's own peak, not the process's history."""

from __future__ import annotations

import pytest
import torch

from less_exp.peak_memory import PeakMemory, supported

pytestmark = pytest.mark.skipif(not supported(torch.device("cpu")), reason="needs /proc/self/clear_refs (Linux)")


def held(megabytes: int) -> int:
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(megabytes << 18)  # float32: 4 bytes each
        block.add_(1)
        del block
    return peak.bytes


def test_each_stretch_reports_its_own_peak():
    big, small = held(96), held(24)
    assert 90 << 20 <= big <= 140 << 20
    assert 20 << 20 <= small <= 60 << 20  # not the earlier 96 MB: the mark was reset and the block returned


def test_memory_freed_inside_a_stretch_is_not_counted_twice():
    with PeakMemory(torch.device("cpu")) as peak:
        for _ in range(6):
            block = torch.ones(32 << 18)
            del block
    assert 28 << 20 <= peak.bytes <= 80 << 20
