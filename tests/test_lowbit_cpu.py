"""The low-bit CPU kernel (AVX512-VNNI, AVX2): layout, arithmetic, segments, salient columns, builds.

The kernel quantizes activations to int8 per row and per 64 columns, then computes exactly (int32
sums) up to float32 rounding. So it is checked two ways: tightly against :func:`sgmv_reference`
(the same quantized activations, plain PyTorch), and loosely against the float formula
``x @ delta^T`` from the stored codes, which bounds what the int8 activations cost. The ``lowbit``
backend built on it is checked against the reference backend in ``tests/test_backends.py``; here,
what is particular to it: its form, one kernel call per layer (or group) and step, and the build choice.
"""

from __future__ import annotations

import functools

import pytest
import torch

from meswitch.deltas import decode, decode_delta
from meswitch.engine import backends
from meswitch.engine.backends.forms import PackedForm
from meswitch.engine.backends.int4 import Int4Form
from meswitch.engine.backends.lowbit import LowbitBackend, LowbitForm
from meswitch.engine.kernels import int4, lowbit_cpu
from meswitch.engine.layers import ExpertLinear, SharedInputLinears
from meswitch.engine.segments import Segments
from tests.delta_helpers import SCHEME_IDS, SCHEMES, encoded, gen, rel_close

BEST = lowbit_cpu.isa("")  # the best build this CPU runs (None: none), whatever MESWITCH_LOWBIT_CPU says
needs_kernel = pytest.mark.skipif(BEST is None, reason=f"{lowbit_cpu.unavailable_reason('')}")
# every build of ISAS: each this CPU runs must compute the same thing (here AVX2 only, say; VNNI skips)
BUILDS = [pytest.param(i, marks=pytest.mark.skipif(i not in lowbit_cpu.supported_isas() or not lowbit_cpu.available(i),
                                                   reason=f"no {i} build here")) for i in lowbit_cpu.ISAS]


def codes_of(out: int, n: int, bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, (out, n), dtype=torch.uint8, generator=gen(seed))


def built(out: int, n: int, bits: int, seed: int, isa: str | None = BEST) -> lowbit_cpu.LowbitDelta:
    """A kernel delta of random ``bits``-bit codes over every column, symmetric grid."""
    d = lowbit_cpu.build(codes_of(out, n, bits, seed), torch.arange(n), torch.rand(out, generator=gen(seed)) + 0.1,
                         None, bits, (out, n), isa)
    assert d is not None
    return d


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


def spy_on_sgmv(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str | None]]:
    """Record ``(number of forms, isa)`` of every :func:`lowbit_cpu.sgmv` call, still computing them."""
    calls: list[tuple[int, str | None]] = []
    real = lowbit_cpu.sgmv

    def spy(x, y, forms, isa=None):  # noqa: ANN001, ANN202
        calls.append((len(forms), isa))
        return real(x, y, forms, isa)

    monkeypatch.setattr(lowbit_cpu, "sgmv", spy)
    return calls


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_layout_holds_every_code_where_the_kernel_reads_it(bits):
    out, n = 20, 70  # a partial block of 16 rows, a partial group of 64 columns
    codes = codes_of(out, n, bits, seed=bits)
    packed = lowbit_cpu.layout(codes, bits)
    assert packed.shape == (2, 128 * bits // 32, 64) and packed.dtype == torch.uint8
    assert torch.equal(decode_layout(packed, bits, out, n), codes)
    assert torch.equal(lowbit_cpu.unlayout(packed, bits, out, n), codes)
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


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("out", "n"), [(48, 192), (40, 200), (16, 64), (576, 1536)])
def test_kernel_matches_the_reference_on_mixed_segments(bits, out, n, isa):
    rows = [0, 3, 3, 12, 21]  # segments of 3, 0, 9 (a tile of 8 and one more) and 9 rows
    forms, ref = [], []
    for i, (s, t) in enumerate(zip(rows, rows[1:], strict=False)):
        codes, scale = codes_of(out, n, bits, seed=10 * i + bits), torch.rand(out, generator=gen(i)) + 0.1
        zero = None if i % 2 else torch.randn(out, generator=gen(50 + i))  # symmetric and asymmetric grids
        d = lowbit_cpu.build(codes, torch.arange(n), scale, zero, bits, (out, n), isa)
        assert d is not None and d.isa == isa
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


@pytest.mark.parametrize("isa", BUILDS)
def test_rows_do_not_depend_on_their_batch(isa):
    """Per-row quantization and per-row sums: a row gives the same bits alone as in any tile of rows."""
    d = built(64, 256, 2, seed=3, isa=isa)
    x = torch.randn(11, 256, generator=gen(2))
    together = torch.zeros(11, 64)
    lowbit_cpu.sgmv(x, together, [(d, 0, 11)], isa=isa)
    for i in range(11):
        alone = torch.zeros(1, 64)
        lowbit_cpu.sgmv(x[i : i + 1], alone, [(d, 0, 1)], isa=isa)
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("isa", BUILDS)
def test_output_may_be_a_column_slice_of_a_wider_tensor(isa):
    d = built(40, 128, 2, seed=4, isa=isa)  # 40 outputs: the last tile of 16 is partial
    x, wide = torch.randn(5, 128, generator=gen(4)), torch.zeros(5, 96)
    lowbit_cpu.sgmv(x, wide[:, 32:72], [(d, 0, 5)], isa=isa)
    alone = torch.zeros(5, 40)
    lowbit_cpu.sgmv(x, alone, [(d, 0, 5)], isa=isa)
    assert torch.equal(wide[:, 32:72], alone)
    assert not wide[:, :32].any() and not wide[:, 72:].any()


@needs_kernel
def test_bad_calls_are_refused_with_what_was_wrong():
    d = built(32, 128, 2, seed=0)
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
    parts = [built(o, 128, b, seed=o) for o, b in ((64, 1), (40, 3), (32, 2))]
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
def test_lowbit_forms_take_every_scheme_but_sign2d_into_the_kernel(scheme):
    """Salient columns (their code slots 0, their zero term taken back out) and asymmetric grids go
    through the kernel's layout; sign2d's column scales keep the int4 form."""
    fields, meta = encoded(scheme, seed=3, n=128)
    record = decode(fields, meta)
    form = LowbitBackend("cpu", isa=BEST).prepare(record)
    x = torch.randn(7, 128, generator=gen(4))
    want = x @ decode_delta(fields, meta).T
    got = form.matmul(x)
    rel_close(got, want, tol=2e-2)
    if meta["method"] == "sign2d":
        assert isinstance(form, Int4Form) or (not int4.available() and isinstance(form, PackedForm))
        return
    assert isinstance(form, LowbitForm) and form.kernel.isa == BEST
    assert form.whole == (record.k == 0)  # whole: one sgmv call gives the delta, no salient part beside it
    assert not torch.equal(got, want)  # the kernel, not the exact path
    out = form.shape[0]
    layout_bits = 4 if meta["bits"] == 3 else meta["bits"]  # 3-bit codes in 4-bit slots
    assert form.kernel.packed.numel() == -(-out // 16) * 16 * 128 * layout_bits // 8  # rows padded to tiles of 16
    stored = PackedForm.of(record, torch.device("cpu"))
    # the layout in place of the packed codes; beside it only the kernel's float32 grid (8 bytes a row)
    assert form.nbytes() - form.kernel.packed.numel() <= stored.nbytes() - stored.packed.numel() + 8 * out


@needs_kernel
@pytest.mark.parametrize("scheme", [("salient", 3, 7, True), ("rtn", 2, 0, False)], ids=["salient-3b", "rtn-2b-asym"])
def test_the_layout_holds_the_codes_once_and_gives_them_back(scheme):
    fields, meta = encoded(scheme, seed=5, out=40, n=128)
    record = decode(fields, meta)
    form = LowbitBackend("cpu", isa=BEST).prepare(record)
    assert isinstance(form, LowbitForm) and not hasattr(form, "packed")  # the layout is the only copy of the codes
    codes = lowbit_cpu.unlayout(form.kernel.packed, form.kernel.bits, *form.shape)
    assert torch.equal(codes.index_select(1, record.rest_idx), record.codes)
    assert not codes.index_select(1, record.salient_idx).any()  # salient slots hold 0
    torch.testing.assert_close(form.dequantize(), decode_delta(fields, meta), rtol=0, atol=0)  # merges read it
    layer = ExpertLinear(torch.nn.Linear(128, 40), LowbitBackend("cpu", isa=BEST))
    layer.set_delta(0, form)
    layer.merge(0)
    torch.testing.assert_close(layer.merged[0], layer.base.weight.detach() + decode_delta(fields, meta))


@needs_kernel
def test_mixed_step_through_expert_linear_is_one_call_for_all_experts(monkeypatch):
    torch.manual_seed(0)
    backend = LowbitBackend("cpu", isa=BEST)
    base = torch.nn.Linear(192, 80)
    layer, dense = ExpertLinear(base, backend), {}
    for e, bits in enumerate((1, 2, 3)):
        fields, meta = encoded(("rtn", bits, 0, e == 1), seed=e, out=80, n=192)
        layer.set_delta(e, backend.prepare(decode(fields, meta)))
        dense[e] = decode_delta(fields, meta)
    calls = spy_on_sgmv(monkeypatch)
    ids = [-1, 0, 0, 1, 1, 1, 2]
    x = torch.randn(len(ids), 192, generator=gen(5))
    with torch.no_grad():
        got = layer(x, Segments.from_ids(ids))
        want = torch.stack([x[i] @ (base.weight + (dense[e] if e >= 0 else 0)).T + base.bias
                            for i, e in enumerate(ids)])
        base_row = x[0] @ base.weight.T + base.bias
    assert calls == [(3, BEST)]  # every expert's rows in one call, on the backend's build
    rel_close(got, want, tol=2e-2)
    torch.testing.assert_close(got[0], base_row)  # base rows untouched


@needs_kernel
def test_a_group_of_mixed_bit_layers_is_one_call_for_every_expert(monkeypatch):
    """The gptq-mixed store gives q, k and v of one expert different bits: still one call per group and step."""
    torch.manual_seed(1)
    backend = LowbitBackend("cpu", isa=BEST)
    bases = [torch.nn.Linear(128, o) for o in (64, 32, 32)]
    mods, dense = [ExpertLinear(b, backend) for b in bases], {}
    for j, m in enumerate(mods):
        for e in range(3):
            fields, meta = encoded(("rtn", 1 + (j + e) % 3, 0, True), seed=10 * j + e, out=bases[j].out_features, n=128)
            m.set_delta(e, backend.prepare(decode(fields, meta)))
            dense[j, e] = decode_delta(fields, meta)
    shared = SharedInputLinears(mods)
    calls = spy_on_sgmv(monkeypatch)
    ids = [-1, 0, 0, 1, 2, 2]
    x = torch.randn(len(ids), 128, generator=gen(8))
    with torch.no_grad():
        got = shared(x, Segments.from_ids(ids))
        wants = [torch.stack([x[i] @ (b.weight + (dense[j, e] if e >= 0 else 0)).T + b.bias for i, e in enumerate(ids)])
                 for j, b in enumerate(bases)]
    assert calls == [(9, BEST)]  # 3 experts x 3 layers
    for g, w in zip(got, wants, strict=True):
        rel_close(g, w, tol=2e-2)


def test_the_environment_picks_or_disables_the_build(monkeypatch):
    """``MESWITCH_LOWBIT_CPU`` is read by ``choose(None)`` (so by ``backends.select``) when called, not per call."""
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "0")
    isa, why = lowbit_cpu.choose()
    assert isa is None and "disabled by MESWITCH_LOWBIT_CPU=0" in why
    assert backends.select("auto", "cpu").backend.name != "lowbit"
    assert lowbit_cpu.choose("")[0] == BEST  # a named request does not read the environment
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "neon")
    assert not lowbit_cpu.available() and "not one of" in lowbit_cpu.unavailable_reason()
    if "avx2" not in lowbit_cpu.supported_isas() or not lowbit_cpu.available("avx2"):
        return
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "avx2")
    assert lowbit_cpu.isa() == "avx2"
    chosen = backends.select("lowbit", "cpu").backend
    assert chosen.name == "lowbit" and chosen.isa == "avx2"
    fields, meta = encoded(("rtn", 2, 0, True), seed=2, out=32, n=128)
    form = chosen.prepare(decode(fields, meta))
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "0")  # too late: the backend chose at start-up
    x = torch.randn(3, 128, generator=gen(6))
    y = torch.zeros(3, 32)
    chosen.add(x, y, [(form, 0, 3, 0)], {})
    assert form.kernel.isa == "avx2"
    rel_close(y, x @ decode_delta(fields, meta).T, tol=2e-2)


def test_without_a_build_the_kernel_refuses_and_the_backend_falls_back(monkeypatch):
    """A CPU without a compiler: ``choose`` says why, the kernel refuses, ``select`` takes the int4 kernel."""
    monkeypatch.setattr(lowbit_cpu, "_build", lambda isa: (None, "no compiler here"))
    monkeypatch.setattr(lowbit_cpu, "_select", functools.cache(lowbit_cpu._select.__wrapped__))  # nothing cached
    assert lowbit_cpu.choose("avx2") == (None, "no compiler here")
    assert not lowbit_cpu.available("avx2") and lowbit_cpu.unavailable_reason("avx2") == "no compiler here"
    assert lowbit_cpu.build(codes_of(32, 128, 2, 1), torch.arange(128), torch.rand(32), None, 2, (32, 128),
                            "avx2") is None
    with pytest.raises(RuntimeError, match="no compiler here"):
        lowbit_cpu.sgmv(torch.randn(1, 128), torch.zeros(1, 32), [], isa="avx2")
    with pytest.raises(RuntimeError, match="no compiler here"):
        LowbitBackend("cpu", isa="avx2")
    chosen = backends.select("lowbit", "cpu", isa="avx2")
    assert chosen.backend.name == ("int4" if int4.available() else "pytorch")
    assert "lowbit: the low-bit CPU kernel is unavailable: no compiler here" in chosen.notes[0]
