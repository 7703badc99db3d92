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
# every build of ISAS: each this CPU runs must give the same bytes (here AVX2 only, say; VNNI skips)
BUILDS = [pytest.param(i, marks=pytest.mark.skipif(i not in lowbit_cpu.supported_isas() or not lowbit_cpu.available(i),
                                                   reason=f"no {i} build here")) for i in lowbit_cpu.ISAS]


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


def columns(n: int, width: int, order: str, seed: int) -> torch.Tensor:
    """``n`` distinct columns of ``width``: ``"ascending"`` (a record's ``rest_idx``) or ``"shuffled"``."""
    cols = torch.randperm(width, generator=gen(seed))[:n]
    return cols.sort().values if order == "ascending" else cols


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{n}" for o, n in SHAPES])
@pytest.mark.parametrize("order", ["none", "ascending", "shuffled"])
@pytest.mark.parametrize("isa", BUILDS)
def test_layout_packed_of_each_build_equals_layout_of_the_codes_in_their_columns(bits, shape, order, isa):
    out, n = shape
    codes = codes_of(out, n, bits, seed=out * 1000 + n + bits)
    lb = lowbit_cpu.LAYOUT_BITS[bits]
    if order == "none":
        rest, width, full = None, n, codes
    else:  # salient columns left out, some before the first code's column
        width = n + 3 + n // 5
        rest = columns(n, width, order, seed=n + bits)
        full = torch.zeros(out, width, dtype=torch.uint8).index_copy_(1, rest, codes)
    got = lowbit_cpu.layout_packed(pack(codes, bits), bits, n, rest, width, isa=isa)
    assert torch.equal(got, lowbit_cpu.layout(full, lb))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("order", ["none", "ascending", "shuffled"])
@pytest.mark.parametrize("isa", BUILDS)
def test_layout_packed_ignores_the_padding_bits_of_a_packed_row(bits, order, isa):
    out, n = 37, 61  # n * bits not a multiple of 8: the last byte of a row has padding bits
    codes = codes_of(out, n, bits, seed=bits)
    packed = pack(codes, bits)
    packed[:, -1] |= (0xFF << (n * bits % 8)) & 0xFF
    assert torch.equal(unpack(packed, bits, n), codes)
    width = n if order == "none" else n + 9
    rest = None if order == "none" else columns(n, width, order, seed=bits)
    full = codes if rest is None else torch.zeros(out, width, dtype=torch.uint8).index_copy_(1, rest, codes)
    got = lowbit_cpu.layout_packed(packed, bits, n, rest, width, isa=isa)
    assert torch.equal(got, lowbit_cpu.layout(full, lowbit_cpu.LAYOUT_BITS[bits]))


@pytest.mark.parametrize("bits,lbits", [(1, 2), (1, 4), (2, 4)])
@pytest.mark.parametrize("order", ["none", "ascending", "shuffled"])
@pytest.mark.parametrize("isa", BUILDS)
def test_layout_packed_into_wider_slots_than_layout_bits(bits, lbits, order, isa):
    out, n = 19, 75
    codes = codes_of(out, n, bits, seed=10 * bits + lbits)
    width = n if order == "none" else n + 20
    cols = torch.zeros(0, dtype=torch.int64) if order == "none" else columns(n, width, order, seed=lbits)
    full = codes if order == "none" else torch.zeros(out, width, dtype=torch.uint8).index_copy_(1, cols, codes)
    got = lowbit_cpu._build(isa)[0].layout_packed(pack(codes, bits), bits, n, cols, width, lbits)
    assert torch.equal(got, lowbit_cpu.layout(full, lbits))


@pytest.mark.parametrize("isa", BUILDS)
def test_layout_packed_gives_the_bytes_of_the_scalar_implementation(isa):
    """Random shapes and columns against ``layout_packed_scalar`` (one code at a time), repeated columns (the
    later code holds one) and rows narrower than a word (read with their neighbours) included."""
    mod = lowbit_cpu._build(isa)[0]
    g = gen(7)
    for trial in range(300):
        bits = int(torch.randint(1, 5, (1,), generator=g))
        lbits = [lb for lb in (1, 2, 4) if lb >= bits][trial % (3 if bits == 1 else 2 if bits == 2 else 1)]
        out, n = int(torch.randint(1, 70, (1,), generator=g)), int(torch.randint(1, 260, (1,), generator=g))
        packed = torch.randint(0, 256, (out, (n * bits + 7) // 8), dtype=torch.uint8, generator=g)  # padding bits too
        kind = trial % 5
        width = n if kind == 0 else n + int(torch.randint(0, 90, (1,), generator=g))
        if kind == 0:
            cols = torch.zeros(0, dtype=torch.int64)
        elif kind == 1:
            cols = torch.randperm(width, generator=g)[:n].sort().values
        elif kind == 2:
            cols = torch.arange(width - n, width)  # one run after width - n empty columns
        elif kind == 3:
            cols = torch.randperm(width, generator=g)[:n]
        else:
            cols = torch.randint(0, width, (n,), generator=g)
        args = (packed, bits, n, cols, width, lbits)
        assert torch.equal(mod.layout_packed(*args), mod.layout_packed_scalar(*args)), (bits, lbits, out, n, kind)


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
