"""The low-bit kernel's layout straight from a store's packed codes (``lowbit_cpu.layout_packed``).

It must give the bytes of ``layout(unpack(packed, bits, n), LAYOUT_BITS[bits])`` (3-bit codes in
4-bit slots), with salient columns' slots 0, and an expert loaded through it (the ``lowbit``
backend on a store's records, never unpacked) must give the logits the unpacked codes gave.
"""

from __future__ import annotations

import copy

import pytest
import torch

from meswitch.deltas import decode, pack, unpack
from meswitch.deltas.records import PackedQuantizedDelta, QuantizedDelta
from meswitch.engine import Engine, EngineConfig
from meswitch.engine.backends import lowbit as lowbit_backend
from meswitch.engine.kernels import lowbit_cpu
from tests.delta_helpers import SCHEME_IDS, SCHEMES, encoded, gen
from tests.engine_helpers import ByteTokenizer, make_store, perturbed, teacher_forced_logits, tiny_family

BEST = lowbit_cpu.isa("")
needs_kernel = pytest.mark.skipif(BEST is None, reason=f"{lowbit_cpu.unavailable_reason('')}")
SHAPES = [(1, 1), (15, 7), (17, 63), (33, 65), (40, 200), (16, 128)]  # out not a multiple of 16, n not of 8 or 64


def codes_of(out: int, n: int, bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (out, n), dtype=torch.uint8, generator=gen(seed))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{n}" for o, n in SHAPES])
@pytest.mark.parametrize("isa", [None, "0"], ids=["kernel", "pytorch"])
def test_layout_packed_equals_layout_of_the_unpacked_codes(bits, shape, isa):
    out, n = shape
    codes = codes_of(out, n, bits, seed=out * 1000 + n + bits)
    lb = lowbit_cpu.LAYOUT_BITS[bits]
    got = lowbit_cpu.layout_packed(pack(codes, bits), bits, n, isa=isa)
    want = lowbit_cpu.layout(codes, lb)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(lowbit_cpu.unlayout(got, lb, out, n), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("isa", [None, "0"], ids=["kernel", "pytorch"])
def test_layout_packed_puts_codes_in_their_columns_and_zeros_in_salient_slots(bits, isa):
    out, width = 21, 150
    rest = torch.randperm(width, generator=gen(bits))[: width - 11].sort().values
    codes = codes_of(out, len(rest), bits, seed=bits)
    full = torch.zeros(out, width, dtype=torch.uint8).index_copy_(1, rest, codes)
    got = lowbit_cpu.layout_packed(pack(codes, bits), bits, len(rest), rest, width, isa=isa)
    assert torch.equal(got, lowbit_cpu.layout(full, lowbit_cpu.LAYOUT_BITS[bits]))


def test_layout_packed_refuses_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match="bytes wide"):
        lowbit_cpu.layout_packed(torch.zeros(4, 3, dtype=torch.uint8), 2, 16)


@needs_kernel
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_build_packed_equals_build_of_the_unpacked_record(scheme):
    fields, meta = encoded(scheme, seed=5, out=37, n=99)
    rec = decode(fields, meta)
    assert isinstance(rec, PackedQuantizedDelta) and "codes" not in rec.__dict__  # not unpacked by decoding
    plain = QuantizedDelta(unpack(fields["codes"], rec.bits, rec.shape[1] - rec.k), rec.scale, rec.zero, rec.bits,
                           rec.salient_idx, rec.salient_cols, rec.col_scale, rec.method)
    assert rec.shape == plain.shape and torch.equal(rec.rest_idx, plain.rest_idx)
    a = lowbit_cpu.build_packed(rec.packed, rec.rest_idx, rec.scale, rec.zero, rec.bits, rec.shape, BEST)
    b = lowbit_cpu.build(plain.codes, plain.rest_idx, plain.scale, plain.zero, plain.bits, plain.shape, BEST)
    assert "codes" not in rec.__dict__
    for name in ("packed", "scale", "zero", "salient_idx"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert (a.bits, a.shape, a.isa) == (b.bits, b.shape, b.isa)
    assert torch.equal(rec.codes, plain.codes)  # unpacked on demand, the same codes
    assert torch.equal(rec.dequantize(), plain.dequantize())


@needs_kernel
@pytest.mark.parametrize("bits,k", [(2, 8), (3, 8), (1, 0), (4, 0)])
def test_an_expert_loaded_from_packed_codes_gives_the_logits_of_the_unpacked_path(tmp_path, monkeypatch, bits, k):
    base = tiny_family("llama")
    store = make_store(tmp_path / "store", base, {"a": perturbed(base, 1), "b": perturbed(base, 2)},
                       method="salient", bits=bits, k=k)
    g = torch.Generator().manual_seed(1)
    seqs = {n: torch.randint(0, 256, (9,), generator=g).tolist() for n in ["b", "base", "a"]}

    def logits():
        eng = Engine(store, copy.deepcopy(base), ByteTokenizer(), EngineConfig(backend="lowbit", max_merged=0))
        return teacher_forced_logits(eng, seqs, prefill=4)

    calls = []
    real = lowbit_cpu.build_packed
    monkeypatch.setattr(lowbit_cpu, "build_packed", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    new = logits()
    assert calls  # the experts' layers went through the packed path
    monkeypatch.setattr(lowbit_backend, "PackedQuantizedDelta", type("NotARecord", (), {}))  # the unpacked path
    calls.clear()
    old = logits()
    assert not calls
    for name in seqs:
        assert torch.equal(new[name], old[name]), name
