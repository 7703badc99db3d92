"""engine: Segments, PackedDelta and MultiExpertLinear against decode_delta, over uneven batches.

The independent reference is always ``encode_delta`` / ``decode_delta`` from the codec, and a plain
row-by-row ``x[i] @ (W_base + delta).T + bias``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meswitch.compress.codec import decode_delta, encode_delta
from meswitch.engine import int4
from meswitch.engine.delta_linear import (
    MODES,
    DeltaFormatError,
    MissingDeltaError,
    MultiExpertLinear,
    PackedDelta,
    delta_matmul,
    delta_matmul_reference,
)
from meswitch.engine.segments import Segments

OUT, IN = 48, 80
# (method, bits, k, symmetric): every method, every bits, salient k = 0 and k > 0, asymmetric
SCHEMES = (
    [("salient", b, 0, True) for b in (1, 2, 3, 4)]
    + [("salient", b, 7, True) for b in (1, 2, 3, 4)]
    + [("salient", b, 5, False) for b in (1, 2, 3, 4)]
    + [("rtn", b, 0, True) for b in (1, 2, 3, 4)]
    + [("rtn", b, 0, False) for b in (1, 2, 3, 4)]
    + [("bitdelta", 1, 0, True)]
    + [("sign2d", 1, 0, True), ("sign2d", 1, 6, True)]
)
SCHEME_IDS = [f"{m}-{b}b-k{k}-{'sym' if s else 'asym'}" for m, b, k, s in SCHEMES]
# segment sizes per expert 0..3 (expert 0 resident but unused) plus base-only rows, and orders
BATCHES = {
    "uneven": [0, 1, 7, 3],
    "single-row": [0, 1, 0, 0],
    "one-expert": [0, 0, 5, 0],
    "empty": [0, 0, 0, 0],
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encoded(scheme: tuple[str, int, int, bool], seed: int, out: int = OUT, n: int = IN):
    """Stored (fields, meta) of a random heavy-ish delta ``[out, n]``."""
    method, bits, k, sym = scheme
    g = gen(seed)
    delta = torch.randn(out, n, generator=g) * torch.exp(torch.randn(n, generator=g)) * 1e-2
    act_sq = torch.exp(torch.randn(n, generator=g))
    return encode_delta(delta, method, bits, k, act_sq, sym)


def interleaved_ids(sizes: list[int], base_rows: int, seed: int) -> list[int]:
    """Expert ``e`` repeated ``sizes[e]`` times plus ``base_rows`` of -1, shuffled."""
    ids = [e for e, n in enumerate(sizes) for _ in range(n)] + [-1] * base_rows
    perm = torch.randperm(len(ids), generator=gen(seed)).tolist()
    return [ids[p] for p in perm]


def rel_close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(scale, 1e-12))


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


def sized_segments(sizes: list[int], experts: list[int]) -> Segments:
    """A hand-built, already sorted Segments that keeps empty segments (``from_ids`` drops them)."""
    ends = torch.tensor(sizes).cumsum(0).tolist()
    ids = [e for e, n in zip(experts, sizes, strict=True) for _ in range(n)]
    t = len(ids)
    return Segments(
        torch.arange(t), torch.arange(t), tuple([0, *ends[:-1]]), tuple(ends), tuple(experts), tuple(ids)
    )


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


# ---------------------------------------------------------------- PackedDelta


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_packed_delta_dense_and_matmul(scheme):
    fields, meta = encoded(scheme, seed=0)
    ref = decode_delta(fields, meta)  # [OUT, IN]
    x = torch.randn(9, IN, generator=gen(2))
    want = x @ ref.T
    for resident in (None, "codes", "dense"):
        pd = PackedDelta.from_fields(fields, meta, resident=resident)
        assert pd.resident == resident
        torch.testing.assert_close(pd.dense(), ref, rtol=0, atol=0)  # exactly decode_delta
        rel_close(pd.matmul(x), want)
        rel_close(pd.matmul(x[:0]), want[:0])
    sizes = {r: PackedDelta.from_fields(fields, meta, resident=r).nbytes() for r in (None, "codes", "dense")}
    n_q = IN - meta["salient"]
    assert sizes["codes"] - sizes[None] == OUT * n_q * 4
    assert sizes["dense"] - sizes[None] == OUT * IN * 4


def test_packed_delta_rejects_bad_fields():
    fields, meta = encoded(("salient", 2, 4, True), seed=0)
    with pytest.raises(DeltaFormatError, match="salient_cols"):
        PackedDelta.from_fields({k: v for k, v in fields.items() if k != "salient_cols"}, meta)
    with pytest.raises(DeltaFormatError, match="packed must be"):
        PackedDelta.from_fields({**fields, "codes": fields["codes"][:, 1:]}, meta)
    with pytest.raises(DeltaFormatError, match="dense"):
        PackedDelta.from_fields({"delta": torch.zeros(4)}, {"method": "dense", "bits": 16, "shape": [4]})
    pd = PackedDelta.from_fields(fields, meta)
    with pytest.raises(ValueError, match=r"\[n, in=80\]"):
        pd.matmul(torch.zeros(2, 79))


# ---------------------------------------------------------------- delta_matmul and the layer


def expert_zoo(scheme, n_experts: int = 4, seed: int = 10):
    """Per expert: (fields, meta) -> PackedDelta and the decoded reference delta."""
    stored = [encoded(scheme, seed + e) for e in range(n_experts)]
    packed = {e: PackedDelta.from_fields(f, m) for e, (f, m) in enumerate(stored)}
    dense = {e: decode_delta(f, m) for e, (f, m) in enumerate(stored)}
    return packed, dense


def plain_rows(x, ids, w, b, dense):
    """Obvious reference: row by row ``x[i] @ (W_base + delta_e)^T + b``."""
    rows = [x[i] @ (w + dense[e] if e >= 0 else w).T + b for i, e in enumerate(ids)]
    return torch.stack(rows) if rows else x.new_zeros(0, w.shape[0])


@pytest.mark.parametrize("batch", BATCHES, ids=list(BATCHES))
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_delta_matmul_matches_reference(scheme, batch):
    packed, dense = expert_zoo(scheme)
    for base_rows, seed in ((0, 3), (4, 4)):
        ids = interleaved_ids(BATCHES[batch], base_rows, seed)
        x = torch.randn(len(ids), IN, generator=gen(seed))
        seg = Segments.from_ids(ids)
        ref = delta_matmul_reference(x, ids, packed)
        want = (
            torch.stack([x[i] @ dense[e].T if e >= 0 else torch.zeros(OUT) for i, e in enumerate(ids)])
            if ids
            else torch.zeros(0, OUT)
        )
        rel_close(ref, want, 1e-5)
        rel_close(delta_matmul(x, seg, packed), ref)
        y0 = torch.randn(len(ids), OUT, generator=gen(5))
        rel_close(delta_matmul(x, seg, packed, y0.clone()), y0 + ref)  # accumulates like punica


@pytest.mark.parametrize("scheme", SCHEMES[::5], ids=SCHEME_IDS[::5])
def test_empty_segments_and_sorted_batches(scheme):
    packed, dense = expert_zoo(scheme)
    seg = sized_segments([2, 0, 1, 7, 0, 3], [-1, 0, 1, 2, 3, 3])  # sizes [0, 1, 7, 3] per expert
    assert seg.is_sorted
    ids = list(seg.expert_ids)
    x = torch.randn(len(ids), IN, generator=gen(11))
    ref = delta_matmul_reference(x, ids, packed)
    rel_close(delta_matmul(x, seg, packed), ref)
    rel_close(delta_matmul(x, Segments.from_ids(ids), packed), ref)
    base = nn.Linear(IN, OUT)
    with torch.no_grad():
        for mode in MODES:
            rel_close(
                MultiExpertLinear(base, packed, mode=mode)(x, seg),
                plain_rows(x, ids, base.weight, base.bias, dense),
            )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", BATCHES, ids=list(BATCHES))
@pytest.mark.parametrize("scheme", SCHEMES[::3] + SCHEMES[-1:], ids=SCHEME_IDS[::3] + SCHEME_IDS[-1:])
def test_multi_expert_linear_every_mode(scheme, batch, bias):
    packed, dense = expert_zoo(scheme)
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=bias)
    w = base.weight.detach()
    b = base.bias.detach() if bias else torch.zeros(OUT)
    ids = interleaved_ids(BATCHES[batch], 3, seed=6)
    x = torch.randn(len(ids), IN, generator=gen(7))
    seg = Segments.from_ids(ids)
    want = plain_rows(x, ids, w, b, dense)
    with torch.no_grad():
        for mode in MODES:
            layer = MultiExpertLinear(base, packed, mode=mode)
            rel_close(layer(x, seg), want)


@pytest.mark.parametrize("scheme", SCHEMES[::4], ids=SCHEME_IDS[::4])
def test_single_expert_batch_merged_equals_other_modes(scheme):
    packed, dense = expert_zoo(scheme)
    base = nn.Linear(IN, OUT)
    layer = MultiExpertLinear(base, packed, mode="merged")
    with torch.no_grad():
        for e in (2, 0, -1, 2):  # switching experts rebuilds the merged weight
            x = torch.randn(6, IN, generator=gen(8 + e))
            seg = Segments.from_ids([e] * 6)
            layer.set_mode("merged")
            merged = layer(x, seg)
            assert layer._merged is None or layer._merged[0] == e
            for mode in MODES[:3]:
                layer.set_mode(mode)
                rel_close(merged, layer(x, seg))
            w = base.weight + (dense[e] if e >= 0 else 0)
            rel_close(merged, x @ w.T + base.bias)


def test_residency_changes():
    packed, dense = expert_zoo(("salient", 2, 4, True), n_experts=3)
    base = nn.Linear(IN, OUT, bias=False)
    layer = MultiExpertLinear(base, {0: packed[0]}, mode="segment-dense")
    assert packed[0].resident == "dense"
    ids = [1, 0, 1, -1]
    x = torch.randn(4, IN, generator=gen(9))
    seg = Segments.from_ids(ids)
    with torch.no_grad():
        with pytest.raises(MissingDeltaError, match="expert 1"):
            layer(x, seg)
        layer.add_delta(1, packed[1])
        rel_close(layer(x, seg), plain_rows(x, ids, base.weight, torch.zeros(OUT), dense))
        size = layer.nbytes()
        assert layer.remove_delta(1) is packed[1]
        assert layer.nbytes() < size
        layer.set_mode("segment-structured", resident=None)
        assert packed[0].resident is None
        layer.set_mode("merged")
        layer(x[:2], Segments.from_ids([0, 0]))
        assert layer._merged is not None
        layer.add_delta(0, packed[2])  # replacing the merged expert drops its merged weight
        assert layer._merged is None
        rel_close(layer(x[:2], Segments.from_ids([0, 0])), x[:2] @ (base.weight + dense[2]).T)
    with pytest.raises(ValueError, match="delta is"):
        layer.add_delta(5, PackedDelta.from_fields(*encoded(("rtn", 2, 0, True), 0, out=8, n=IN)))
    with pytest.raises(ValueError, match="mode must be"):
        layer.set_mode("fast")


# ---------------------------------------------------------------- fused int4 CPU path

@pytest.mark.skipif(not int4.available(), reason="this PyTorch lacks the CPU int4 weight-only kernels")
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_int4_residency_matches_decode_delta_to_bf16_precision(scheme):
    fields, meta = encoded(scheme, seed=3, n=128)
    ref = decode_delta(fields, meta)  # [OUT, 128]
    x = torch.randn(7, 128, generator=gen(4))
    pd = PackedDelta.from_fields(fields, meta, resident="int4")
    assert pd.resident == "int4"
    got, want = pd.matmul(x), x @ ref.T
    rel_close(got, want, tol=1.5e-2)  # bf16 activations and scales inside the kernel
    assert (got - want).abs().max() > 0  # it is the fused kernel, not the exact path
    exact = PackedDelta.from_fields(fields, meta)
    assert pd.nbytes() - exact.nbytes() < OUT * 128  # about half a byte per weight, not four


def test_int4_residency_falls_back_to_exact_path_for_shapes_the_kernel_cannot_take():
    fields, meta = encoded(SCHEMES[5], seed=0)  # IN = 80: no group size divides it
    pd = PackedDelta.from_fields(fields, meta, resident="int4")
    assert pd.resident is None
    x = torch.randn(3, IN, generator=gen(1))
    torch.testing.assert_close(pd.matmul(x), x @ decode_delta(fields, meta).T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ids", [[-1, 0, 0, 2, 2], [2, -1, 0, 2, 0]])  # sorted and not
def test_expert_norm_adds_each_rows_own_norm_delta(ids):
    from meswitch.engine.layers import ExpertNorm

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
