"""Layers that read one input (q/k/v, gate/up) run as one: stacked base weights, stacked fused deltas.

What must hold: the group gives the numbers each layer gives alone (the same kernel on the same
rows, so the int4 and low-bit paths match up to float32 summation order), the base is held once,
and a stacked delta follows its experts when they are dropped or replaced.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meswitch.compress.codec import decode_delta
from meswitch.engine import int4, lowbit_cpu
from meswitch.engine.delta_linear import PackedDelta
from meswitch.engine.layers import ExpertLinear, ExpertNorm, SharedInputLinears
from meswitch.engine.segments import Segments
from tests.test_delta_linear import encoded, gen, rel_close

needs_int4 = pytest.mark.skipif(not int4.available(), reason="this PyTorch lacks the CPU int4 weight-only kernels")
FUSED = [pytest.param("int4", marks=needs_int4),
         pytest.param("lowbit", marks=pytest.mark.skipif(not lowbit_cpu.available(), reason="no low-bit CPU kernel"))]
IN, OUTS = 320, (128, 64, 32)  # a q/k/v-like group; 320 input features: 5 of the kernel's groups of 64


def group(bias: bool, resident: str | None = "int4", experts=(0, 1, 2), seed: int = 0):
    """Three ExpertLinears over one input, every expert a 2-bit delta in each; and their dense references."""
    torch.manual_seed(seed)
    bases = [nn.Linear(IN, o, bias=bias) for o in OUTS]
    mods = [ExpertLinear(b) for b in bases]
    dense: dict[tuple[int, int], torch.Tensor] = {}
    for j, m in enumerate(mods):
        for e in experts:
            fields, meta = encoded(("rtn", 2, 0, True), seed=100 * j + e, out=OUTS[j], n=IN)
            m.deltas[e] = PackedDelta.from_fields(fields, meta, resident=resident)
            dense[j, e] = decode_delta(fields, meta)
    return bases, mods, dense


def one_by_one(mods, x, segments):
    return [m(x, segments) for m in mods]


@needs_int4
def test_concat_is_the_parts_side_by_side_and_holds_the_codes_once():
    _, mods, _ = group(bias=False)
    parts = [m.deltas[1].fused for m in mods]
    xb = torch.randn(5, IN, generator=gen(1)).bfloat16()
    stacked, views = int4.concat(parts)
    assert torch.equal(stacked.mm(xb), torch.cat([p.mm(xb) for p in parts], 1))
    assert [tuple(v.packed.shape) for v in views] == [tuple(p.packed.shape) for p in parts]
    for v in views:  # the parts now read their rows of the stacked codes and scales: nothing is held twice
        assert v.packed.untyped_storage().data_ptr() == stacked.packed.untyped_storage().data_ptr()
        assert v.sz.untyped_storage().data_ptr() == stacked.sz.untyped_storage().data_ptr()
        assert torch.equal(v.mm(xb), parts[views.index(v)].mm(xb))
    # a part that needs its activations scaled cannot join: one kernel call would not give its delta
    scaled = int4.Int4Delta(parts[0].packed, parts[0].group, parts[0].sz, parts[0].x_scale, OUTS[0], False)
    assert int4.concat([scaled, parts[1]]) is None
    # nor can rows that end inside one of the kernel's interleaved blocks, unless they come last
    assert int4.row_block() in (16, 32, 64, 128)
    if OUTS[2] % int4.row_block():
        assert int4.concat([parts[2], parts[1]]) is None
        assert int4.concat([parts[1], parts[2]]) is not None


@pytest.mark.parametrize("resident", FUSED)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ids", [
    [-1, -1, 0, 0, 0, 1, 2, 2],  # sorted mixed step: stacked int4 deltas
    [2, 0, -1, 1, 0, 2, -1, 0],  # unsorted: each layer's own path
    [-1, -1, -1],  # base only: one stacked matmul
    [1, 1, 1],  # one expert, not merged: stacked base plus its deltas
], ids=["sorted", "unsorted", "base", "one-expert"])
def test_group_equals_each_layer_alone(bias, ids, resident):
    bases, mods, dense = group(bias, resident)
    x = torch.randn(len(ids), IN, generator=gen(2))
    segments = Segments.from_ids(ids)
    want = one_by_one(mods, x, segments)  # before stacking: the layers' own weights
    shared = SharedInputLinears(mods)
    got = shared(x, segments)
    for j, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == (len(ids), OUTS[j])
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        # and against the obvious formula, to the precision of the kernel's delta term (bf16 or int8 activations)
        ref = torch.stack([x[i] @ (bases[j].weight + (dense[j, e] if e >= 0 else 0)).T for i, e in enumerate(ids)])
        if bias:
            ref = ref + bases[j].bias
        rel_close(g, ref.detach(), tol=1.5e-2)


@needs_int4
def test_group_holds_the_base_once_and_steps_aside_when_a_weight_is_replaced():
    bases, mods, _ = group(bias=True)
    before = [b.weight.detach().clone() for b in bases]
    shared = SharedInputLinears(mods)
    storage = shared.weight.untyped_storage().data_ptr()
    for b, w in zip(bases, before, strict=True):  # the layers' parameters are views of the stacked weight
        assert b.weight.untyped_storage().data_ptr() == storage
        assert torch.equal(b.weight, w)
    ids = [-1, 0, 1, 1, 2]
    x = torch.randn(len(ids), IN, generator=gen(3))
    segments = Segments.from_ids(ids)
    with torch.no_grad():  # someone replaces a weight (a fine-tune, a move): the group must not serve the stale copy
        bases[1].weight.data = bases[1].weight.detach() * 2
    got = shared(x, segments)
    torch.testing.assert_close(got[1], mods[1](x, segments))
    assert not torch.allclose(got[1], x @ before[1].T + bases[1].bias, atol=1e-3)


@pytest.mark.parametrize("resident", FUSED)
def test_stacked_delta_follows_its_experts(resident):
    _, mods, _ = group(bias=False, resident=resident)
    shared = SharedInputLinears(mods)
    ids = [0, 1, 1, 2]
    x = torch.randn(len(ids), IN, generator=gen(4))
    segments = Segments.from_ids(ids)
    shared(x, segments)
    if resident == "int4":  # int4 deltas are stacked per expert; low-bit ones need no stacked copy
        assert set(mods[0].fused) == {0, 1, 2}
    # expert 1 reloaded with another delta in one layer: the stacked form is rebuilt from it
    fields, meta = encoded(("rtn", 3, 0, True), seed=77, out=OUTS[2], n=IN)
    mods[2].deltas[1] = PackedDelta.from_fields(fields, meta, resident=resident)
    got = shared(x, segments)
    assert mods[2].deltas[1].resident == resident
    torch.testing.assert_close(got[2], one_by_one(mods, x, segments)[2], rtol=1e-5, atol=1e-5)
    # dropped: the stacked codes go with it
    for m in mods:
        m.drop(1)
    assert 1 not in mods[0].fused
    rows = shared(x, segments)
    torch.testing.assert_close(rows[0][1:3], x[1:3] @ mods[0].base.weight.T)


def test_group_without_int4_forms_uses_each_layers_exact_path():
    bases, mods, dense = group(bias=False, resident=None)
    ids = [0, 0, 1, 2, 2]
    x = torch.randn(len(ids), IN, generator=gen(5))
    segments = Segments.from_ids(ids)
    got = SharedInputLinears(mods)(x, segments)
    for j in range(len(OUTS)):
        ref = torch.stack([x[i] @ (bases[j].weight + dense[j, e]).T for i, e in enumerate(ids)])
        torch.testing.assert_close(got[j], ref.detach(), rtol=1e-5, atol=1e-5)


def test_expert_norm_table_follows_replaced_and_dropped_deltas():
    g = torch.Generator().manual_seed(6)
    weight, x = torch.rand(6, generator=g) + 0.5, torch.randn(4, 6, generator=g)
    norm = ExpertNorm(weight, 1e-6)
    d0, d0b = torch.randn(6, generator=g), torch.randn(6, generator=g)
    norm.deltas[0] = d0
    ids = [-1, 0, 0, 5]  # expert 5 has no norm delta here (and an id beyond the table so far)
    segments, rows = Segments.from_ids(ids), torch.tensor(ids)
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def want(d):
        return normed * torch.stack([weight + (d if e == 0 else 0) for e in ids])

    torch.testing.assert_close(norm(x, segments, rows), want(d0))
    norm.deltas[0] = d0b  # replaced: the table is rebuilt
    torch.testing.assert_close(norm(x, segments, rows), want(d0b))
    norm.drop(0)  # dropped: the base weight for every row
    torch.testing.assert_close(norm(x, segments, rows), normed * weight)


def test_serving_model_leaves_the_hugging_face_model_working():
    """The stacked weights are views of the same values: the wrapped model computes what it did."""
    from meswitch.engine.model import ServingModel
    from tests.conftest import tiny_llama

    hf = tiny_llama(seed=3)
    ids = torch.randint(0, 128, (2, 7), generator=gen(7))
    with torch.no_grad():
        before = hf(ids).logits
        served = ServingModel(hf)
        after = hf(ids).logits
    assert torch.equal(before, after)
    layer = served.layers[0]
    assert layer.q.base.weight.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
