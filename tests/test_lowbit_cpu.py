"""The low-bit CPU kernel (AVX512-VNNI): layout, arithmetic, segments, salient columns, fallbacks.

The kernel quantizes activations to int8 per row and per 64 columns, then computes exactly (int32
sums) up to float32 rounding. So it is checked two ways: tightly against :func:`sgmv_reference`
(the same quantized activations, plain PyTorch), and loosely against the float formula
``x @ delta^T`` from the stored codes, which bounds what the int8 activations cost.
"""

from __future__ import annotations

import pytest
import torch

from meswitch.compress.codec import decode_delta
from meswitch.engine import lowbit_cpu
from meswitch.engine.delta_linear import PackedDelta
from meswitch.engine.layers import ExpertLinear, SharedInputLinears
from meswitch.engine.segments import Segments
from tests.test_delta_linear import SCHEME_IDS, SCHEMES, encoded, gen, rel_close

needs_kernel = pytest.mark.skipif(not lowbit_cpu.available(), reason=f"{lowbit_cpu.unavailable_reason()}")
# every build this CPU can run (AVX512-VNNI and AVX2 here): each must compute the same thing
BUILDS = [pytest.param(i, marks=pytest.mark.skipif(i not in lowbit_cpu.supported_isas() or lowbit_cpu._build(i)[0] is None,
                                                   reason=f"no {i} build here")) for i in lowbit_cpu.ISAS]


def codes_of(out: int, n: int, bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (out, n), dtype=torch.uint8, generator=gen(seed))


def decode_layout(packed: torch.Tensor, bits: int, out: int, n: int) -> torch.Tensor:
    """The layout read back by its definition, one byte at a time (independent of :func:`lowbit_cpu.layout`)."""
    planes, codes = 8 // bits, torch.zeros(out, n, dtype=torch.uint8)
    for o in range(out):
        for k in range(n):
            quad, j = divmod(k, 4)
            chunk, p = divmod(quad, planes)
            byte = int(packed[o // 16, chunk, 4 * (o % 16) + j])
            codes[o, k] = (byte >> (bits * p)) & ((1 << bits) - 1)
    return codes


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_layout_holds_every_code_where_the_kernel_reads_it(bits):
    out, n = 20, 70  # a partial block of 16 rows, a partial group of 64 columns
    codes = codes_of(out, n, bits, seed=bits)
    packed = lowbit_cpu.layout(codes, bits)
    assert packed.shape == (2, 128 * bits // 32, 64) and packed.dtype == torch.uint8
    assert torch.equal(decode_layout(packed, bits, out, n), codes)
    assert packed.numel() == 2 * 16 * 128 * bits // 8  # bits / 8 bytes per (padded) weight


def test_layout_refuses_bits_it_has_no_planes_for():
    with pytest.raises(ValueError, match="1, 2 or 4"):
        lowbit_cpu.layout(codes_of(16, 64, 3, 0), 3)


def test_quantize_reference_is_int8_per_row_and_group():
    x = torch.randn(3, 150, generator=gen(1)) * torch.linspace(0.1, 20, 150)
    xh = lowbit_cpu.quantize_reference(x)
    for g0 in range(0, 150, 64):
        grp, got = x[:, g0 : g0 + 64], xh[:, g0 : g0 + 64]
        step = grp.abs().amax(1, keepdim=True) / 127
        assert ((got - grp).abs() <= step / 2 + 1e-6).all()  # rounded to the nearest of 255 levels
        assert torch.allclose(torch.round(got / step), got / step, atol=1e-3)
    assert torch.equal(lowbit_cpu.quantize_reference(torch.zeros(2, 64)), torch.zeros(2, 64))


@needs_kernel
@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("out", "n"), [(48, 192), (40, 200), (16, 64), (576, 1536)])
def test_kernel_matches_the_reference_on_mixed_segments(bits, out, n, isa):
    rows = [0, 3, 3, 12, 21]  # segments of 3, 0, 9 (a tile of 8 and one more) and 9 rows
    forms, ref = [], []
    for i, (s, t) in enumerate(zip(rows, rows[1:], strict=False)):
        codes, scale = codes_of(out, n, bits, seed=10 * i + bits), torch.rand(out, generator=gen(i)) + 0.1
        zero = None if i % 2 else torch.randn(out, generator=gen(50 + i))  # symmetric and asymmetric grids
        d = lowbit_cpu.build(codes, torch.arange(n), scale, zero, bits, (out, n))
        m = ((1 << bits) - 1) / 2
        forms.append((d, s, t))
        ref.append((codes, scale, -m * scale if zero is None else zero, s, t))
    x = torch.randn(rows[-1], n, generator=gen(7)) * 2
    y0 = torch.randn(rows[-1], out, generator=gen(8))
    got, want = y0.clone(), y0.clone()
    lowbit_cpu.sgmv(x, got, forms, isa=isa)
    lowbit_cpu.sgmv_reference(x, want, ref)
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-6 * scale  # float32 rounding only
    exact = y0.clone()
    for codes, s_, z, s, t in ref:  # the float formula: the int8 activations' own error, per 64 columns
        exact[s:t] += x[s:t] @ (codes.float() * s_[:, None] + z[:, None]).T
    rel_close(got, exact, tol=2e-2)
    assert not torch.equal(got, exact)


@needs_kernel
@pytest.mark.parametrize("isa", BUILDS)
def test_rows_do_not_depend_on_their_batch(isa):
    """Per-row quantization and per-row sums: a row gives the same bits alone as in any tile of rows."""
    codes = codes_of(64, 256, 2, seed=3)
    d = lowbit_cpu.build(codes, torch.arange(256), torch.rand(64, generator=gen(1)), None, 2, (64, 256))
    x = torch.randn(11, 256, generator=gen(2))
    together = torch.zeros(11, 64)
    lowbit_cpu.sgmv(x, together, [(d, 0, 11)], isa=isa)
    for i in range(11):
        alone = torch.zeros(1, 64)
        lowbit_cpu.sgmv(x[i : i + 1], alone, [(d, 0, 1)], isa=isa)
        assert torch.equal(alone[0], together[i])


@needs_kernel
@pytest.mark.parametrize("isa", BUILDS)
def test_output_may_be_a_column_slice_of_a_wider_tensor(isa):
    codes = codes_of(40, 128, 2, seed=4)  # 40 outputs: the last tile of 16 is partial
    d = lowbit_cpu.build(codes, torch.arange(128), torch.rand(40, generator=gen(3)), None, 2, (40, 128))
    x, wide = torch.randn(5, 128, generator=gen(4)), torch.zeros(5, 96)
    lowbit_cpu.sgmv(x, wide[:, 32:72], [(d, 0, 5)], isa=isa)
    alone = torch.zeros(5, 40)
    lowbit_cpu.sgmv(x, alone, [(d, 0, 5)], isa=isa)
    assert torch.equal(wide[:, 32:72], alone)
    assert not wide[:, :32].any() and not wide[:, 72:].any()


@needs_kernel
def test_bad_calls_are_refused_with_what_was_wrong():
    d = lowbit_cpu.build(codes_of(32, 128, 2, 0), torch.arange(128), torch.rand(32), None, 2, (32, 128))
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="float32"):
        lowbit_cpu.sgmv(x, torch.zeros(4, 32, dtype=torch.bfloat16), [(d, 0, 4)])
    with pytest.raises(RuntimeError, match="out of range"):
        lowbit_cpu.sgmv(x, torch.zeros(4, 32), [(d, 2, 6)])
    with pytest.raises(RuntimeError, match="packed delta 0 must be"):
        lowbit_cpu.sgmv(torch.randn(4, 256), torch.zeros(4, 32), [(d, 0, 4)])  # codes for 128 inputs, x has 256


@needs_kernel
def test_layers_of_one_input_are_one_call_on_their_own_columns_whatever_their_bits():
    """q/k/v-like: three deltas of different widths and bits write their columns of one output."""
    parts = [lowbit_cpu.build(codes_of(o, 128, b, seed=o), torch.arange(128), torch.rand(o, generator=gen(o)), None,
                              b, (o, 128)) for o, b in ((64, 1), (40, 3), (32, 2))]
    x = torch.randn(6, 128, generator=gen(9))
    y = torch.zeros(6, 136)
    lowbit_cpu.sgmv(x, y, [(parts[0], 0, 3, 0), (parts[1], 0, 3, 64), (parts[2], 0, 3, 104),
                           (parts[0], 3, 6, 0), (parts[2], 3, 6, 104)])  # rows 3-5 have no delta in columns 64-103
    want = torch.cat([p.matmul(x) for p in parts], 1)
    assert torch.equal(y[:3], want[:3])
    assert torch.equal(y[3:, :64], want[3:, :64]) and torch.equal(y[3:, 104:], want[3:, 104:])
    assert not y[3:, 64:104].any()
    with pytest.raises(RuntimeError, match="overlap in rows and columns"):  # they would race in parallel
        lowbit_cpu.sgmv(x, y, [(parts[0], 0, 4, 0), (parts[0], 3, 6, 32)])
    with pytest.raises(RuntimeError, match=r"columns \[120, 160\) out of range"):
        lowbit_cpu.sgmv(x, y, [(parts[1], 0, 6, 120)])


@needs_kernel
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_lowbit_residency_matches_decode_delta(scheme):
    """Every stored scheme: salient columns (their code slots 0, their zero term taken back out) and
    asymmetric grids in the kernel; sign2d's column scales keep the int4 form."""
    fields, meta = encoded(scheme, seed=3, n=128)
    x = torch.randn(7, 128, generator=gen(4))
    pd = PackedDelta.from_fields(fields, meta, resident="lowbit")
    want = x @ decode_delta(fields, meta).T
    got = pd.matmul(x)
    rel_close(got, want, tol=2e-2)
    if meta["method"] == "sign2d":
        assert pd.resident == "int4"
        return
    assert pd.resident == "lowbit"
    assert not torch.equal(got, want)  # the kernel, not the exact path
    out = pd.shape[0]
    layout_bits = 4 if meta["bits"] == 3 else meta["bits"]  # 3-bit codes in 4-bit slots
    assert pd.fused.packed.numel() == -(-out // 16) * 16 * 128 * layout_bits // 8  # rows padded to tiles of 16
    exact = PackedDelta.from_fields(fields, meta)
    assert pd.nbytes() == exact.nbytes() - exact.packed.numel() + pd.fused.nbytes()  # the layout in place of the codes


@needs_kernel
def test_mixed_step_through_expert_linear_is_one_call_for_all_experts(monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(192, 80)
    layer, dense = ExpertLinear(base), {}
    for e, bits in enumerate((1, 2, 3)):
        fields, meta = encoded(("rtn", bits, 0, e == 1), seed=e, out=80, n=192)
        layer.deltas[e] = PackedDelta.from_fields(fields, meta, resident="lowbit")
        dense[e] = decode_delta(fields, meta)
    calls = []
    real = lowbit_cpu.sgmv
    monkeypatch.setattr(lowbit_cpu, "sgmv", lambda x, y, forms: (calls.append(len(forms)), real(x, y, forms)))
    ids = [-1, 0, 0, 1, 1, 1, 2]
    x = torch.randn(len(ids), 192, generator=gen(5))
    got = layer(x, Segments.from_ids(ids))
    assert calls == [3]
    want = torch.stack([x[i] @ (base.weight + (dense[e] if e >= 0 else 0)).T + base.bias for i, e in enumerate(ids)])
    rel_close(got, want.detach(), tol=2e-2)
    torch.testing.assert_close(got[0], (x[0] @ base.weight.T + base.bias).detach())  # base rows untouched


def test_without_the_kernel_lowbit_residency_is_the_int4_form(monkeypatch):
    monkeypatch.setattr(lowbit_cpu, "_extension", lambda: (None, "no compiler here"))
    assert not lowbit_cpu.available() and lowbit_cpu.unavailable_reason() == "no compiler here"
    fields, meta = encoded(("rtn", 2, 0, True), seed=1, out=32, n=128)
    pd = PackedDelta.from_fields(fields, meta, resident="lowbit")
    assert pd.resident in ("int4", None)  # int4 where this PyTorch has its kernel
    with pytest.raises(RuntimeError, match="no compiler here"):
        lowbit_cpu.sgmv(torch.randn(1, 128), torch.zeros(1, 32), [])


@needs_kernel
@pytest.mark.parametrize("scheme", [("salient", 3, 7, True), ("rtn", 2, 0, False)], ids=["salient-3b", "rtn-2b-asym"])
def test_the_layout_holds_the_codes_once_and_gives_them_back(scheme):
    fields, meta = encoded(scheme, seed=5, out=40, n=128)
    exact = PackedDelta.from_fields(fields, meta)
    pd = PackedDelta.from_fields(fields, meta, resident="lowbit")
    assert pd.codes_in_fused and pd.packed.numel() == 0  # released: the layout is the only copy
    assert pd.nbytes() == exact.nbytes() - exact.packed.numel() + pd.fused.nbytes()
    assert torch.equal(pd.codes(), exact.codes())
    assert torch.equal(pd.stored_codes(), fields["codes"])
    torch.testing.assert_close(pd.dense(), decode_delta(fields, meta), rtol=0, atol=0)  # merges read it
    moved = pd.to("cpu")
    assert torch.equal(moved.packed, fields["codes"])
    pd.set_resident(None)  # leaving the layout brings the stored codes back
    assert not pd.codes_in_fused and torch.equal(pd.packed, fields["codes"]) and pd.fused is None


def test_the_environment_picks_or_disables_the_build(monkeypatch):
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "0")
    assert not lowbit_cpu.available() and "MESWITCH_LOWBIT_CPU=0" in lowbit_cpu.unavailable_reason()
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "neon")
    assert not lowbit_cpu.available() and "not one of" in lowbit_cpu.unavailable_reason()
    if "avx2" in lowbit_cpu.supported_isas() and lowbit_cpu._build("avx2")[0] is not None:
        monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "avx2")
        assert lowbit_cpu.isa() == "avx2"
        fields, meta = encoded(("rtn", 2, 0, True), seed=2, out=32, n=128)
        pd = PackedDelta.from_fields(fields, meta, resident="lowbit")
        x = torch.randn(3, 128, generator=gen(6))
        rel_close(pd.matmul(x), x @ decode_delta(fields, meta).T, tol=2e-2)


@needs_kernel
def test_a_group_of_mixed_bit_layers_is_one_call_for_every_expert(monkeypatch):
    """The gptq-mixed store gives q, k and v of one expert different bits: still one call per group and step."""
    torch.manual_seed(1)
    bases = [torch.nn.Linear(128, o) for o in (64, 32, 32)]
    mods, dense = [ExpertLinear(b) for b in bases], {}
    for j, m in enumerate(mods):
        for e in range(3):
            fields, meta = encoded(("rtn", 1 + (j + e) % 3, 0, True), seed=10 * j + e, out=bases[j].out_features, n=128)
            m.deltas[e] = PackedDelta.from_fields(fields, meta, resident="lowbit")
            dense[j, e] = decode_delta(fields, meta)
    shared = SharedInputLinears(mods)
    calls = []
    real = lowbit_cpu.sgmv
    monkeypatch.setattr(lowbit_cpu, "sgmv", lambda x, y, forms: (calls.append(len(forms)), real(x, y, forms)))
    ids = [-1, 0, 0, 1, 2, 2]
    x = torch.randn(len(ids), 128, generator=gen(8))
    got = shared(x, Segments.from_ids(ids))
    assert calls == [9]  # 3 experts x 3 layers
    for j, b in enumerate(bases):
        want = torch.stack([x[i] @ (b.weight + (dense[j, e] if e >= 0 else 0)).T + b.bias for i, e in enumerate(ids)])
        rel_close(got[j], want.detach(), tol=2e-2)
