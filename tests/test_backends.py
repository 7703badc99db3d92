"""Every delta backend against the reference, through the one interface: ``prepare`` and ``add``.

One parametrised test per behaviour, over every backend (each low-bit kernel build this CPU has;
Triton under its interpreter without a GPU) x every stored scheme x uneven segments. Tolerances
are each kernel's arithmetic: float32 for the PyTorch paths, bf16 activations for int4, int8
activations for the low-bit kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernel module is first imported

from meswitch.deltas import LowRankDelta, decode, decode_delta
from meswitch.engine import backends
from meswitch.engine.backends.forms import DenseForm
from meswitch.engine.kernels import int4, lowbit_cpu, sgmv_triton
from meswitch.engine.layers import ExpertLinear, SharedInputLinears
from meswitch.engine.segments import Segments
from tests.delta_helpers import (
    BATCHES,
    IN,
    OUT,
    SCHEME_IDS,
    SCHEMES,
    encoded,
    gen,
    interleaved_ids,
    rel_close,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"reference": 1e-5, "pytorch": 1e-4, "dense": 1e-4, "int4": 2e-2, "lowbit": 3e-2, "triton": 1e-4}


def _cases() -> list:
    cases = []
    for name in backends.BACKENDS:
        if name == "lowbit":
            for isa in lowbit_cpu.ISAS:
                ok = isa in lowbit_cpu.supported_isas() and lowbit_cpu.available(isa)
                cases.append(pytest.param(("lowbit", isa), id=f"lowbit-{isa}",
                                          marks=pytest.mark.skipif(not ok, reason=f"no {isa} build here")))
        elif name == "int4":
            cases.append(pytest.param(("int4", None), id="int4",
                                      marks=pytest.mark.skipif(not int4.available(), reason="no int4 kernel")))
        elif name == "triton":
            cases.append(pytest.param(("triton", None), id="triton", marks=pytest.mark.skipif(
                not sgmv_triton.available(), reason="triton is not installed")))
        else:
            cases.append(pytest.param((name, None), id=name))
    return cases


CASES = _cases()


def make(case: tuple[str, str | None]) -> backends.DeltaBackend:
    name, isa = case
    cls = backends.backend_class(name)
    if name == "lowbit":
        return cls("cpu", isa=isa)
    return cls(DEVICE if name == "triton" else "cpu")


def stored_experts(scheme, n: int = 4, seed: int = 10, out: int = OUT):
    return [encoded(scheme, seed + e, out=out) for e in range(n)]


def sorted_ids(sizes: list[int], base_rows: int) -> list[int]:
    return [-1] * base_rows + [e for e, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("batch", BATCHES, ids=list(BATCHES))
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("case", CASES)
def test_add_matches_the_reference_on_uneven_segments(case, scheme, batch):
    if case[0] == "triton" and batch != "uneven":
        pytest.skip("the interpreter is slow: one batch shape is enough for the kernel's own tests")
    backend = make(case)
    stored = stored_experts(scheme)
    forms = {e: backend.prepare(decode(f, m)) for e, (f, m) in enumerate(stored)}
    dense = {e: decode_delta(f, m) for e, (f, m) in enumerate(stored)}
    ids = sorted_ids(BATCHES[batch], base_rows=2)
    seg = Segments.from_ids(ids)
    x = torch.randn(len(ids), IN, generator=gen(7))
    y0 = torch.randn(len(ids), OUT, generator=gen(8))
    y = y0.clone().to(DEVICE)
    backend.add(x.to(DEVICE), y, [(forms[e], s, t, 0) for e, s, t in seg if e >= 0], {})
    want = torch.stack([y0[i] + (x[i] @ dense[e].T if e >= 0 else 0) for i, e in enumerate(ids)])
    rel_close(y.cpu() - y0, want - y0, TOL[case[0]])


LORAS = {"r16-fp16": (16, torch.float16), "r5-bf16": (5, torch.bfloat16)}  # whole and partial vector blocks


def lora_stored(seed: int, rank: int, dtype: torch.dtype, out: int = OUT):
    """Stored (fields, meta) of a random LoRA delta ``scale * b @ a`` with 16-bit factors."""
    g = gen(seed)
    record = LowRankDelta((torch.randn(rank, IN, generator=g) * 0.1).to(dtype),
                          (torch.randn(out, rank, generator=g) * 0.1).to(dtype), 0.5 + seed % 3)
    return record.fields(), record.meta()


@pytest.mark.parametrize("batch", BATCHES, ids=list(BATCHES))
@pytest.mark.parametrize("lora", LORAS)
@pytest.mark.parametrize("case", CASES)
def test_lora_add_matches_the_reference_on_uneven_segments(case, lora, batch):
    """LoRA forms through ``add``, as the reference adds them and as float64 products of the 16-bit factors."""
    if case[0] == "triton" and batch != "uneven":
        pytest.skip("the interpreter is slow: one batch shape is enough for the kernel's own tests")
    backend, reference = make(case), backends.backend_class("reference")("cpu")
    stored = [lora_stored(30 + e, *LORAS[lora]) for e in range(4)]
    ids = sorted_ids(BATCHES[batch], base_rows=2)
    seg = Segments.from_ids(ids)
    x = torch.randn(len(ids), IN, generator=gen(7))
    y0 = torch.randn(len(ids), OUT, generator=gen(8))
    y, y_ref = y0.clone().to(DEVICE), y0.clone()
    backend.add(x.to(DEVICE), y, [(backend.prepare(decode(*stored[e])), s, t, 0) for e, s, t in seg if e >= 0], {})
    reference.add(x, y_ref, [(reference.prepare(decode(*stored[e])), s, t, 0) for e, s, t in seg if e >= 0], {})
    dense = [m["scale"] * f["lora_b"].double() @ f["lora_a"].double() for f, m in stored]
    want = torch.stack([x[i].double() @ dense[e].T if e >= 0 else torch.zeros(OUT, dtype=torch.float64)
                        for i, e in enumerate(ids)])
    rel_close((y.cpu() - y0).double(), want, 1e-5)  # float32 products in every backend, whatever its kernels
    rel_close(y.cpu() - y0, y_ref - y0, 1e-5)
    assert torch.equal(y.cpu()[:2], y0[:2])  # base rows untouched


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("case", CASES)
def test_every_form_gives_the_stored_delta_back_exactly(case, scheme):
    fields, meta = encoded(scheme, seed=4)
    form = make(case).prepare(decode(fields, meta))
    assert tuple(form.shape) == (OUT, IN)
    assert torch.equal(form.dequantize().cpu(), decode_delta(fields, meta))  # merged weights are built from it
    x = torch.randn(5, IN, generator=gen(2))
    rel_close(form.matmul(x.to(DEVICE)).cpu(), x @ decode_delta(fields, meta).T, TOL[case[0]])


@pytest.mark.parametrize("case", CASES)
def test_layers_of_one_input_take_their_own_columns_of_a_wider_output(case):
    """A q/k/v-like group: deltas of three widths and mixed bits on columns [0, 48), [48, 64), [64, 96)."""
    backend = make(case)
    widths, schemes = [48, 16, 32], [("rtn", 1, 0, True), ("salient", 3, 5, False), ("rtn", 2, 0, True)]
    ids = sorted_ids([3, 0, 4], base_rows=1)
    seg = Segments.from_ids(ids)
    x = torch.randn(len(ids), IN, generator=gen(3))
    y = torch.zeros(len(ids), sum(widths), device=DEVICE)
    want = torch.zeros(len(ids), sum(widths))
    work, col = [], 0
    for j, (w, scheme) in enumerate(zip(widths, schemes, strict=True)):
        for e, s, t in seg:
            if e < 0:
                continue
            fields, meta = encoded(scheme, seed=20 * j + e, out=w)
            work.append((backend.prepare(decode(fields, meta)), s, t, col))
            want[s:t, col : col + w] = x[s:t] @ decode_delta(fields, meta).T
        col += w
    backend.add(x.to(DEVICE), y, work, {})
    rel_close(y.cpu(), want, TOL[case[0]])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("batch", ["uneven", "one-expert"])
@pytest.mark.parametrize("case", CASES)
def test_expert_linear_on_a_shuffled_batch_equals_each_row_alone(case, batch, bias):
    backend = make(case)
    base = torch.nn.Linear(IN, OUT, bias=bias)
    layer = ExpertLinear(base, backend).to(DEVICE)
    stored = stored_experts(("salient", 2, 7, True)) + [(  # and one lossless dense delta (expert 4)
        {"delta": torch.randn(OUT, IN, generator=gen(5)).half()}, {"method": "dense", "bits": 16,
                                                                   "shape": [OUT, IN], "salient": 0})]
    for e, (f, m) in enumerate(stored):
        layer.set_delta(e, backend.prepare(decode(f, m)))
    ids = interleaved_ids(BATCHES[batch] + [2], base_rows=3, seed=1)
    x = torch.randn(len(ids), IN, generator=gen(6))
    with torch.no_grad():
        got = layer(x.to(DEVICE), Segments.from_ids(ids)).cpu()
        w, b = base.weight.cpu(), (base.bias.cpu() if bias else 0)
        want = torch.stack([x[i] @ (w + (decode_delta(*stored[e]) if e >= 0 else 0)).T + b
                            for i, e in enumerate(ids)])
    rel_close(got, want, max(TOL[case[0]], 1e-5))


def test_a_group_of_layers_equals_each_layer_alone_and_is_one_backend_call(monkeypatch):
    backend = backends.backend_class("pytorch")("cpu")
    layers = [ExpertLinear(torch.nn.Linear(IN, w), backend) for w in (48, 16, 16)]
    for j, layer in enumerate(layers):
        for e in (0, 2):
            layer.set_delta(e, backend.prepare(decode(*encoded(("rtn", 2, 0, True), 3 * j + e, out=layer.shape[0]))))
    ids = [-1, 0, 0, 2, 2, 2]
    seg, x = Segments.from_ids(ids), torch.randn(6, IN, generator=gen(9))
    with torch.no_grad():
        alone = [m(x, seg) for m in layers]
        group = SharedInputLinears(layers)
        calls = []
        real = backend.add
        monkeypatch.setattr(backend, "add", lambda *a: (calls.append(len(a[2])), real(*a)))
        together = group(x, seg)
    assert calls == [6]  # three layers x two experts, one call
    for a, b in zip(alone, together, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lowbit_forms_hold_the_codes_once_in_the_kernel_layout():
    if not lowbit_cpu.available(""):
        pytest.skip(f"{lowbit_cpu.unavailable_reason('')}")
    record = decode(*encoded(("rtn", 2, 0, True), seed=1))
    low = backends.backend_class("lowbit")("cpu").prepare(record)
    packed = backends.backend_class("reference")("cpu").prepare(record)
    assert not hasattr(low, "packed") and type(low).__name__ == "LowbitForm"
    # the layout (2 bits a weight, padded to 64 columns) plus a float32 grid: no second copy of the codes
    assert low.nbytes() <= 48 * 128 * 2 // 8 + 4 * 48 * 4 + 8 * IN
    assert low.nbytes() < packed.nbytes() + 48 * 128 * 2 // 8


def test_selection_falls_back_and_says_why(monkeypatch):
    chosen = backends.select("lowbit", "cpu", isa="0")
    assert chosen.backend.name == ("int4" if int4.available() else "pytorch")
    assert any("disabled by MESWITCH_LOWBIT_CPU=0" in note for note in chosen.notes)
    assert "passed over" in chosen.describe()
    on_cpu = backends.select("triton", "cpu")
    assert on_cpu.backend.name == "pytorch" and "CUDA devices only" in on_cpu.notes[0]
    auto = backends.select("auto", "cpu")
    assert auto.backend.name == ("lowbit" if lowbit_cpu.available("") else "int4")
    monkeypatch.setenv("MESWITCH_LOWBIT_CPU", "0")  # read once, by select
    assert backends.select("auto", "cpu").backend.name != "lowbit"
    with pytest.raises(ValueError, match="unknown delta backend 'fast'"):
        backends.select("fast", "cpu")


def test_every_registered_name_gives_the_backend_of_that_name():
    # CASES are read from the registry, so a new backend is tested above; here its entry must point at it
    for name in backends.BACKENDS:
        assert backends.backend_class(name).name == name


def test_a_form_of_another_shape_is_refused_by_the_layer():
    layer = ExpertLinear(torch.nn.Linear(IN, OUT), backends.backend_class("reference")("cpu"))
    with pytest.raises(ValueError, match=r"delta is \[48, 79\], the base weight \[48, 80\]"):
        layer.set_delta(0, DenseForm(torch.zeros(OUT, IN - 1)))
