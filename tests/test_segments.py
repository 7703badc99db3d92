"""engine: Segments (rows grouped by expert) and ExpertNorm (per-row norm deltas) against row-by-row formulas."""

from __future__ import annotations

import pytest
import torch

from meswitch.engine.layers import ExpertNorm
from meswitch.engine.segments import Segments
from tests.delta_helpers import gen

# ---------------------------------------------------------------- Segments


@pytest.mark.parametrize(
    "ids",
    [[], [-1], [3], [2, 0, 2, -1, 1, 0, -1, 2], [1, 1, 1], [0, 1, 2, 3], [5, 4, 3, -1], [-1, -1, 0]],
)
def test_segments_group_stably_and_round_trip(ids):
    seg = Segments.from_ids(ids)
    order = seg.order.tolist()
    assert sorted(order) == list(range(len(ids)))
    assert [ids[i] for i in order] == sorted(ids)
    for e, s, t in seg:  # contiguous, ascending, non-empty, stable within a segment
        rows = order[s:t]
        assert t > s and all(ids[r] == e for r in rows) and rows == sorted(rows)
    assert list(seg.experts) == sorted(set(ids))
    x = torch.randn(len(ids), 3, generator=gen(1))
    torch.testing.assert_close(seg.gather(x), x[seg.order], rtol=0, atol=0)
    torch.testing.assert_close(seg.scatter(seg.gather(x)), x, rtol=0, atol=0)
    assert seg.single_expert == (ids[0] if len(set(ids)) == 1 else None)
    assert seg.is_sorted == (ids == sorted(ids))


def test_segments_reject_bad_input():
    with pytest.raises(ValueError, match=">= -1"):
        Segments.from_ids([0, -2])
    with pytest.raises(ValueError, match="not all expert 1"):
        Segments(torch.arange(3), torch.arange(3), (0, 2), (2, 3), (0, 1), (0, 0, 0))
    with pytest.raises(ValueError, match="tile"):
        Segments(torch.arange(2), torch.arange(2), (0, 0), (1, 2), (0, 1), (0, 1))
    seg = Segments.from_ids([0, 1])
    with pytest.raises(ValueError, match="T=2 rows"):
        seg.gather(torch.zeros(3, 4))


@pytest.mark.parametrize("ids", [[-1, 0, 0, 2, 2], [2, -1, 0, 2, 0]])  # sorted and not
def test_expert_norm_adds_each_rows_own_norm_delta(ids):
    g = torch.Generator().manual_seed(4)
    weight, x = torch.rand(6, generator=g) + 0.5, torch.randn(5, 6, generator=g)
    norm = ExpertNorm(weight, 1e-6)
    norm.deltas = {0: torch.randn(6, generator=g).half(), 2: torch.randn(6, generator=g).half()}
    segments = Segments.from_ids(ids)
    got = norm(x, segments, torch.tensor(ids))
    for i, e in enumerate(ids):  # row by row: RMS-normalize, then the base weight plus that row's delta
        w = weight + (norm.deltas[e].float() if e >= 0 else 0)
        want = x[i] / torch.sqrt(x[i].pow(2).mean() + 1e-6) * w
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
    assert segments.is_sorted == (ids == sorted(ids))
