"""The Triton multi-expert kernel against the slow reference (Punica-style comparison over uneven batches).

Without a GPU the kernel runs under Triton's interpreter, which executes the same kernel code with
NumPy: every path of it (bit widths, salient gathers, asymmetric grids, long segments) is checked
here; bf16 inputs, which the interpreter does not handle, are checked on a GPU by
``benchmarks/gpu_sgmv.py``. The kernel reads :class:`PackedForm` s (the store's packed codes); the
``triton`` backend built on it is checked against the reference backend in ``tests/test_backends.py``,
and here for what is particular to it: one launch per layer and step, and its table kept per layer.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is first imported

pytest.importorskip("triton")

from meswitch.compress.codec import encode_delta  # noqa: E402
from meswitch.deltas import decode  # noqa: E402
from meswitch.engine.backends.forms import DenseForm, PackedForm  # noqa: E402
from meswitch.engine.backends.pytorch import PyTorchBackend  # noqa: E402
from meswitch.engine.backends.triton import TritonBackend  # noqa: E402
from meswitch.engine.kernels import sgmv_triton  # noqa: E402
from meswitch.engine.layers import ExpertLinear  # noqa: E402
from meswitch.engine.segments import Segments  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (method, bits, salient k, symmetric): every layout the kernel reads, all bit widths.
SETTINGS = [
    ("rtn", 1, 0, True), ("rtn", 2, 0, False), ("rtn", 3, 0, True), ("rtn", 4, 0, True),
    ("salient", 3, 5, True), ("salient", 2, 7, False), ("bitdelta", 1, 0, True), ("gptq", 2, 0, True),
]


def _stored(out: int, n: int, method: str, bits: int, k: int, symmetric: bool, gen: torch.Generator):
    d = torch.randn(out, n, generator=gen) * 0.02
    kw: dict = {"symmetric": symmetric}
    if method == "gptq":
        x = torch.randn(4 * n, n, generator=gen)
        kw["hessian"] = x.T @ x
    if method == "salient":
        kw["act_sq"] = torch.rand(n, generator=gen)
    return encode_delta(d, method, bits, k, **kw)


def _delta(out: int, n: int, method: str, bits: int, k: int, symmetric: bool, gen: torch.Generator) -> PackedForm:
    """A stored delta as the kernel reads it: its :class:`PackedForm` on the device."""
    return PackedForm.of(decode(*_stored(out, n, method, bits, k, symmetric, gen)), torch.device(DEVICE))


def _deltas(out: int, n: int, seed: int) -> dict[int, PackedForm]:
    gen = torch.Generator().manual_seed(seed)
    return {i: _delta(out, n, *s, gen=gen) for i, s in enumerate(SETTINGS)}


def _reference(x: torch.Tensor, ids: list[int], deltas: dict, y: torch.Tensor) -> torch.Tensor:
    """``y[i] += x[i] @ deltas[ids[i]].dequantize()^T`` row by row in float32, nothing for ``-1``; returns ``y``."""
    for i, e in enumerate(ids):
        if e >= 0:
            y[i] += x[i].float() @ deltas[e].dequantize().T
    return y


def _run(x: torch.Tensor, ids: list[int], deltas: dict[int, PackedForm], y0: torch.Tensor) -> torch.Tensor:
    seg = Segments.from_ids(ids).to(DEVICE)
    y = sgmv_triton.sgmv_delta(x, seg, sgmv_triton.ExpertTable.build(deltas, torch.device(DEVICE)), y0.clone())
    return sgmv_triton.add_salient(x, seg, deltas, y)


def _rel(got: torch.Tensor, want: torch.Tensor, y0: torch.Tensor) -> float:
    return float((got.float() - want).norm() / (want - y0.float()).norm())


@pytest.mark.parametrize("shape", [(70, 100), (130, 300)])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference_on_a_shuffled_mixed_batch(shape: tuple[int, int], seed: int) -> None:
    out, n = shape
    deltas = _deltas(out, n, seed)
    rng = random.Random(seed)
    ids = [e for e in range(len(SETTINGS)) for _ in range(rng.randint(1, 5))] + [-1, -1]
    rng.shuffle(ids)  # batch order is not segment order: rows are gathered and scattered
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(len(ids), n, generator=gen).to(DEVICE)
    y0 = torch.randn(len(ids), out, generator=gen).to(DEVICE)  # accumulated into, never overwritten
    want = _reference(x, ids, deltas, y0.clone())
    got = _run(x, ids, deltas, y0)
    assert _rel(got, want, y0) < 1e-5
    base_rows = [i for i, e in enumerate(ids) if e < 0]
    assert torch.equal(got[base_rows], y0[base_rows])


@pytest.mark.parametrize("rows", [17, 40, 130])
def test_long_segments_span_several_row_tiles(rows: int) -> None:
    """Prefill-sized segments: more rows than one program's tile (16/32/64)."""
    deltas = _deltas(48, 64, seed=3)
    ids = [2] * rows + [5] * 3 + [0] * (rows // 2)
    gen = torch.Generator().manual_seed(4)
    x, y0 = torch.randn(len(ids), 64, generator=gen).to(DEVICE), torch.zeros(len(ids), 48).to(DEVICE)
    assert _rel(_run(x, ids, deltas, y0), _reference(x, ids, deltas, y0.clone()), y0) < 1e-5


@pytest.mark.parametrize("plan", [
    sgmv_triton.Plan(1, 32, 256, 1, False), sgmv_triton.Plan(2, 32, 64, 3, False),
    sgmv_triton.Plan(4, 16, 64, 2, False), sgmv_triton.Plan(8, 16, 64, 1, False),
    sgmv_triton.Plan(16, 64, 128, 1, True), sgmv_triton.Plan(32, 32, 32, 4, True),
])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.float16])
def test_every_plan_computes_the_same(plan: sgmv_triton.Plan, ydtype: torch.dtype) -> None:
    """Row tiles smaller and larger than the segments, K split across programs (atomic adds), both paths."""
    deltas = _deltas(40, 136, seed=11)
    ids = [0] * 5 + [1] + [2] * 9 + [4] * 2 + [6, 7, 7, 7]
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(len(ids), 136, generator=gen).to(DEVICE)
    y0 = torch.randn(len(ids), 40, generator=gen).to(DEVICE, ydtype)
    seg = Segments.from_ids(ids).to(DEVICE)
    table = sgmv_triton.ExpertTable.build(deltas, torch.device(DEVICE))
    got = sgmv_triton.add_salient(x, seg, deltas, sgmv_triton.sgmv_delta(x, seg, table, y0.clone(), plan))
    want = _reference(x, ids, deltas, y0.float().clone())
    assert _rel(got, want, y0.float()) < (1e-5 if ydtype == torch.float32 else 2e-2)


def test_half_precision_inputs_accumulate_in_float32() -> None:
    deltas = _deltas(64, 96, seed=5)
    ids = [0, 1, 1, 2, 3, 4, 5, 6, 7, 7]
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(len(ids), 96, generator=gen).half().to(DEVICE)
    y0 = torch.randn(len(ids), 64, generator=gen).to(DEVICE)
    want = _reference(x.float(), ids, deltas, y0.clone())
    assert _rel(_run(x, ids, deltas, y0), want, y0) < 1e-5  # fp16 x times exact levels: exact products
    y16 = _run(x, ids, deltas, y0.half())  # a half-precision output is rounded once
    assert _rel(y16, want, y0) < 2e-2


def test_rows_of_experts_without_a_kernel_row_are_left_alone() -> None:
    """Expert 9 is past the table, expert 1 is a sign2d delta the kernel does not take."""
    gen = torch.Generator().manual_seed(7)
    d = torch.randn(32, 64, generator=gen) * 0.02
    sign2d = PackedForm.of(decode(*encode_delta(d, "sign2d", 1, 0)), torch.device(DEVICE))
    deltas = {0: _delta(32, 64, "rtn", 2, 0, True, gen), 1: sign2d}
    assert not sgmv_triton.supports(sign2d) and not sgmv_triton.supports(DenseForm(d))
    ids = [0, 1, 9, 0]
    x, y0 = torch.randn(4, 64, generator=gen).to(DEVICE), torch.randn(4, 32, generator=gen).to(DEVICE)
    got = _run(x, ids, deltas, y0)
    assert torch.equal(got[1:3], y0[1:3])
    want = _reference(x, [0, -1, -1, 0], {0: deltas[0]}, y0.clone())
    assert _rel(got, want, y0) < 1e-5


def test_table_is_rebuilt_when_a_layer_s_deltas_change() -> None:
    """The backend keeps the layer's kernel table in the layer's state while its step's forms stay the same."""
    gen = torch.Generator().manual_seed(8)
    layer = ExpertLinear(torch.nn.Linear(64, 32).to(DEVICE), TritonBackend(DEVICE))
    layer.set_delta(0, _delta(32, 64, "rtn", 2, 0, True, gen))
    layer.set_delta(1, _delta(32, 64, "rtn", 1, 0, True, gen))
    x = torch.randn(4, 64, generator=gen).to(DEVICE)
    both, one = Segments.from_ids([0, 0, 1, -1]).to(DEVICE), Segments.from_ids([-1, 0, 0, -1]).to(DEVICE)

    def table() -> sgmv_triton.ExpertTable:
        return layer.state[("triton", 0)][1]

    with torch.no_grad():
        layer(x, both)
        first = table()
        assert [int(b) for b in first.ints[:, 0]] == [2, 1]  # row j: the step's j-th form
        layer(x, both)
        assert table() is first  # same forms: the table is reused
        layer(x, one)
        assert table() is not first and table().ptrs.shape[0] == 1  # another set of experts in the step
        layer.set_delta(0, _delta(32, 64, "rtn", 3, 0, True, gen))  # an expert reloaded under the same index
        assert ("triton", 0) not in layer.state
        layer(x, both)
        assert [int(b) for b in table().ints[:, 0]] == [3, 1]
        layer.drop(0)
        assert not layer.state


def test_expert_linear_takes_the_kernel_path_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mixed batch with packed, sign2d and dense deltas: the Triton backend (kernel + PyTorch for
    what it does not take) = the PyTorch backend, with one launch for the layer."""
    gen = torch.Generator().manual_seed(9)
    base = torch.nn.Linear(96, 40).to(DEVICE)
    d = torch.randn(40, 96, generator=gen) * 0.02
    stored = [_stored(40, 96, *s, gen=gen) for s in SETTINGS[:4]]
    stored.append(encode_delta(d, "sign2d", 1, 4))
    stored.append(({"delta": d.half()}, {"method": "dense", "bits": 16, "shape": [40, 96], "salient": 0}))
    layers = {}
    for backend in (PyTorchBackend(DEVICE), TritonBackend(DEVICE)):
        layers[backend.name] = layer = ExpertLinear(base, backend)
        for i, (fields, meta) in enumerate(stored):
            layer.set_delta(i, backend.prepare(decode(fields, meta)))
    ids = [5, 0, 0, 3, -1, 4, 1, 2, 2, 7]
    x = torch.randn(len(ids), 96, generator=gen).to(DEVICE)
    seg = Segments.from_ids(ids).to(DEVICE)
    calls: list[int] = []
    real = sgmv_triton.sgmv_delta

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sgmv_triton, "sgmv_delta", spy)
    with torch.no_grad():
        want = layers["pytorch"](x, seg)
        assert calls == []
        got = layers["triton"](x, seg)
        assert calls == [1]
        assert float((got - want).norm() / (want - base(x)).norm()) < 1e-5


def test_column_strided_input_is_accepted_and_a_strided_output_refused() -> None:
    deltas = _deltas(32, 64, seed=13)
    ids = [0, 0, 3, 6]
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(64, len(ids), generator=gen).to(DEVICE).T  # [T, in] with column stride T
    y0 = torch.randn(len(ids), 32, generator=gen).to(DEVICE)
    want = _reference(x, ids, deltas, y0.clone())
    assert _rel(_run(x, ids, deltas, y0), want, y0) < 1e-5
    with pytest.raises(ValueError, match="contiguous rows"):
        _run(x.contiguous(), ids, deltas, torch.zeros(32, len(ids), device=DEVICE).T)
