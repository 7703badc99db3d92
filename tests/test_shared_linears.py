"""Layers that read one input (q/k/v, gate/up) run as one: a stacked base weight, one backend ``add``.

What must hold, whatever the backend: the group gives the numbers each layer gives alone (the same
kernel on the same rows, so the int4 and low-bit paths match up to float32 summation order), the
base is held once, and the group serves each layer's current deltas when they are replaced or dropped.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernel module is first imported

from meswitch.deltas import decode, decode_delta
from meswitch.engine import backends
from meswitch.engine.kernels import int4, lowbit_cpu, sgmv_triton
from meswitch.engine.layers import ExpertLinear, ExpertNorm, SharedInputLinears
from meswitch.engine.segments import Segments
from tests.delta_helpers import encoded, gen, rel_close

needs_int4 = pytest.mark.skipif(not int4.available(), reason="this PyTorch lacks the CPU int4 weight-only kernels")
needs_lowbit = pytest.mark.skipif(not lowbit_cpu.available(""), reason=f"{lowbit_cpu.unavailable_reason('')}")
BACKENDS = ["reference", pytest.param("int4", marks=needs_int4), pytest.param("lowbit", marks=needs_lowbit)]
TOL = {"reference": 1e-5, "int4": 1.5e-2, "lowbit": 1.5e-2}  # against the float formula: the kernels' activations
IN, OUTS = 320, (128, 64, 32)  # a q/k/v-like group; 320 input features: 5 of the kernel's groups of 64


def make(name: str) -> backends.DeltaBackend:
    if name == "triton":  # on the CPU under Triton's interpreter, as tests/test_backends.py runs it
        return backends.backend_class("triton")("cuda" if torch.cuda.is_available() else "cpu")
    return backends.create(name, "cpu", isa="" if name == "lowbit" else None)


def group(bias: bool, backend: str = "reference", experts=(0, 1, 2), seed: int = 0):
    """Three ExpertLinears over one input, every expert a 2-bit delta in each; and their dense references."""
    torch.manual_seed(seed)
    chosen = make(backend)
    bases = [nn.Linear(IN, o, bias=bias) for o in OUTS]
    mods = [ExpertLinear(b, chosen) for b in bases]
    dense: dict[tuple[int, int], torch.Tensor] = {}
    for j, m in enumerate(mods):
        for e in experts:
            fields, meta = encoded(("rtn", 2, 0, True), seed=100 * j + e, out=OUTS[j], n=IN)
            m.set_delta(e, chosen.prepare(decode(fields, meta)))
            dense[j, e] = decode_delta(fields, meta)
    return bases, mods, dense


def one_by_one(mods, x, segments):
    return [m(x, segments) for m in mods]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ids", [
    [-1, -1, 0, 0, 0, 1, 2, 2],  # sorted mixed step: one backend add for the group
    [2, 0, -1, 1, 0, 2, -1, 0],  # unsorted: rows gathered, added, scattered back
    [-1, -1, -1],  # base only: one stacked matmul
    [1, 1, 1],  # one expert, not merged: stacked base plus its deltas
], ids=["sorted", "unsorted", "base", "one-expert"])
def test_group_equals_each_layer_alone(bias, ids, backend):
    bases, mods, dense = group(bias, backend)
    x = torch.randn(len(ids), IN, generator=gen(2))
    segments = Segments.from_ids(ids)
    with torch.no_grad():
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
            rel_close(g, ref, tol=TOL[backend])


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


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(
    not sgmv_triton.available(), reason="triton is not installed"))])
def test_group_serves_replaced_and_dropped_deltas(backend):
    """The group keeps backend state of its own (the Triton backend's kernel tables): a delta replaced
    or dropped in one layer must still be what the group serves."""
    _, mods, _ = group(bias=False, backend=backend)
    device = torch.device("cuda" if backend == "triton" and torch.cuda.is_available() else "cpu")
    for m in mods:
        m.to(device)
    shared = SharedInputLinears(mods)
    ids = [0, 1, 1, 2]
    x = torch.randn(len(ids), IN, generator=gen(4)).to(device)
    segments = Segments.from_ids(ids)
    with torch.no_grad():
        shared(x, segments)
        # expert 1 reloaded with another delta in one layer
        fields, meta = encoded(("rtn", 3, 0, True), seed=77, out=OUTS[2], n=IN)
        mods[2].set_delta(1, mods[2].backend.prepare(decode(fields, meta)))
        got = shared(x, segments)
        torch.testing.assert_close(got[2], one_by_one(mods, x, segments)[2], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[2][1:3], x[1:3] @ (mods[2].base.weight + decode_delta(
            *encoded(("rtn", 2, 0, True), seed=100 * 2 + 1, out=OUTS[2], n=IN)).to(device)).T, atol=1e-4)
        # dropped: its rows get the base
        for m in mods:
            m.drop(1)
        rows = shared(x, segments)
        torch.testing.assert_close(rows[0][1:3], x[1:3] @ mods[0].base.weight.T)
        torch.testing.assert_close(rows[0], one_by_one(mods, x, segments)[0], rtol=1e-5, atol=1e-5)


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
        served = ServingModel(hf, backends.select("auto", "cpu").backend)
        after = hf(ids).logits
    assert torch.equal(before, after)
    layer = served.layers[0]
    assert layer.q.base.weight.untyped_storage().data_ptr() == layer.qkv.weight.untyped_storage().data_ptr()
