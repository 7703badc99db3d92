"""A GPU path for mixed-expert batches: one Triton launch adds every segment's ``x @ delta_e^T``.

Shapes: ``T`` rows of a step, ``S`` segments, ``E`` expert indices of a layer (its table rows),
``in``/``out`` the layer's features, ``k_e`` salient columns of expert ``e``, ``K_e = in - k_e``.
The kernel reads each expert's codes straight from the store's packed little-endian bitstream
(:mod:`meswitch.deltas.pack`): ``bits_e / 8`` bytes per weight, no unpacked or dense copy. Its
semantics, in plain PyTorch (:class:`~meswitch.engine.backends.base.ReferenceBackend` is the
slow reference it is tested against)::

    for e, s, t in segments:                          # sorted rows [s, t) of expert e (-1: none)
        rows = order[s:t]
        x_r = x[rows][:, rest_idx_e]                  # [n, K_e], the quantized columns
        c = unpack(codes_e, bits_e, K_e)              # [out, K_e]
        m = (2**bits_e - 1) / 2
        y[rows] += (x_r @ (c - m).T) * scale_e + x_r.sum(1, keepdim=True) * zq_e   # [n, out]
        y[rows] += x[rows][:, salient_idx_e] @ salient_cols_e.T                    # torch, k_e > 0

with ``zq_e = m * scale_e + zero_e`` for an asymmetric grid (``c * s + z = (c - m) * s + zq``) and
no such term for a symmetric one; bitdelta's one scale is broadcast (stride 0). ``sign2d`` deltas
(a per-column scale) and dense deltas are not taken: :func:`supports` says so, and callers run
those through the PyTorch path.

The grid is ``(cdiv(out, BLOCK_N), S, cdiv(longest segment, BLOCK_M))``; a program loads its rows'
activations (gathered through ``order`` and ``rest_idx``), unpacks a ``[BLOCK_N, BLOCK_K]`` tile of
codes for the segment's bit width (a branch per width, so experts at 1, 2, 3 and 4 bits share one
launch), and accumulates ``x @ (c - m)^T`` on the matrix units in float32. Levels ``c - m`` are
exact in 16 bit, so with a bf16/fp16 model the only rounding is the accumulation order; float32
inputs use full-precision (``ieee``) dots. Segments own disjoint rows, so ``y`` needs no atomics.

Per expert the layer keeps an :class:`ExpertTable` row (pointers to codes, scale, zq, rest_idx and
six ints), rebuilt only when the layer's deltas change. On a CPU the kernel runs under Triton's
interpreter (``TRITON_INTERPRET=1``, tests only); serving uses it on CUDA alone.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from meswitch.engine.segments import Segments


class PackedCodes(Protocol):
    """A delta as the kernel reads it: the store's packed codes and grid (``engine.backends.forms.PackedForm``)."""

    packed: Tensor  # uint8 [out, packed_cols(in - k, bits)]
    scale: Tensor  # float32 [out] or [1]
    zero: Tensor | None  # float32 [out]
    col_scale: Tensor | None  # sign2d: not taken by the kernel
    rest_idx: Tensor  # int64 [in - k]
    salient_idx: Tensor  # int64 [k]
    salient_cols: Tensor  # float32 [out, k]
    bits: int
    shape: tuple[int, int]

    @property
    def k(self) -> int: ...

_INTS = 6  # bits, packed row stride (bytes), K_e, has rest_idx, has zq, scale stride
_PTRS = 4  # codes, scale, zq, rest_idx


@functools.cache
def available() -> bool:
    """Whether Triton is importable (it ships with CUDA builds of PyTorch)."""
    return importlib.util.find_spec("triton") is not None


def supports(delta: object) -> bool:
    """Whether the kernel computes this delta (packed codes without per-column scales)."""
    return isinstance(getattr(delta, "packed", None), Tensor) and getattr(delta, "col_scale", None) is None


@dataclass(frozen=True, eq=False)
class ExpertTable:
    """One layer's experts as the kernel reads them; rows for indices without a delta have ``bits = 0``.

    ``ptrs: int64 [E, 4]`` device addresses (codes, scale, zq, rest_idx), ``ints: int32 [E, 6]``,
    ``keep``: the tensors those addresses point into (they must outlive the table).
    """

    ptrs: Tensor
    ints: Tensor
    keep: tuple[Tensor, ...]

    @classmethod
    def build(cls, deltas: Mapping[int, PackedCodes], device: torch.device) -> ExpertTable:
        """Rows for every ``deltas`` index the kernel :func:`supports`; others stay ``bits = 0``."""
        rows = max(deltas, default=-1) + 1
        ptrs = torch.zeros(rows, _PTRS, dtype=torch.int64)
        ints = torch.zeros(rows, _INTS, dtype=torch.int32)
        keep: list[Tensor] = []
        for e, d in deltas.items():
            if not supports(d):
                continue
            m = ((1 << d.bits) - 1) / 2
            codes = d.packed.contiguous()
            scale = d.scale.float().contiguous()
            zq = None if d.zero is None else (m * scale + d.zero.float()).contiguous()
            idx = d.rest_idx.to(torch.int32).contiguous() if d.k else None
            keep += [t for t in (codes, scale, zq, idx) if t is not None]
            ptrs[e] = torch.tensor([t.data_ptr() if t is not None else 0 for t in (codes, scale, zq, idx)])
            ints[e] = torch.tensor([d.bits, codes.shape[1], d.shape[1] - d.k, idx is not None, zq is not None,
                                    0 if scale.numel() == 1 else 1])
        return cls(ptrs.to(device), ints.to(device), tuple(keep))


class Plan(NamedTuple):
    """How one launch tiles the work: rows, output and input columns per program, K split, matrix units."""

    block_m: int
    block_n: int
    block_k: int
    split: int  # programs sharing one tile's K range (atomic float32 adds when > 1)
    dot: bool  # tl.dot on the matrix units (long segments) or multiply-and-reduce in registers (decode)
    warps: int = 4


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def choose_plan(longest: int, segments: int, out: int, in_features: int, device: torch.device) -> Plan:
    """The tiling for a launch, from measurements on an H200 (docs/engine.md, ``benchmarks/gpu_sgmv.py``).

    Segments of one row (decode with every request on its own expert) multiply and reduce in
    registers over long K tiles; longer segments use ``tl.dot`` (the register path's 3-D products
    were 3x slower from 4 rows up). K is split until there are about four programs per
    multiprocessor (decode of one or a few experts otherwise leaves most of the GPU idle), keeping
    at least two K tiles per program.
    """
    if longest == 1:
        plan = Plan(1, 16, 512, 1, False)
    else:
        bm = 16 if longest <= 16 else 32 if longest <= 32 else 64
        plan = Plan(bm, 64, 128, 1, True)
    programs = -(-out // plan.block_n) * segments * -(-longest // plan.block_m)
    k_tiles = -(-in_features // plan.block_k)
    split = max(1, min(-(-4 * _processors(device) // programs), k_tiles // 2, 32))
    return plan._replace(split=split)


def sgmv_delta(x: Tensor, segments: Segments, table: ExpertTable, y: Tensor, plan: Plan | None = None) -> Tensor:
    """``y[rows of e] += x[rows of e] @ delta_e^T`` (quantized columns) for every segment, in place.

    ``x: [T, in]`` (float32/bf16/fp16), ``y: [T, out]`` in any float dtype, ``table`` from
    :meth:`ExpertTable.build`, ``segments`` on ``x``'s device (:meth:`Segments.to`: its ``order``
    and ``bounds`` are then built once per batch for every layer). Returns ``y``. Salient columns
    are not added here (:func:`add_salient`). ``plan``: :func:`choose_plan`'s unless given.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != segments.num_rows or y.shape[0] != x.shape[0]:
        raise ValueError(f"x must be [T={segments.num_rows}, in] and y [T, out], got {tuple(x.shape)}, {tuple(y.shape)}")
    if y.stride(1) != 1:
        raise ValueError("y must have contiguous rows (it is written in place)")
    if x.stride(1) != 1:
        x = x.contiguous()
    if not segments.num_rows or not len(segments):
        return y
    if segments.order.device != x.device:
        segments = segments.to(x.device)
    longest = max(t - s for s, t in zip(segments.starts, segments.ends, strict=True))
    out = y.shape[1]
    p = plan or choose_plan(longest, len(segments), out, x.shape[1], x.device)
    target = y if p.split == 1 or y.dtype == torch.float32 else torch.zeros(y.shape, device=y.device)
    grid = (-(-out // p.block_n), len(segments), -(-longest // p.block_m) * p.split)
    _kernel()[grid](
        x, target, segments.order, segments.bounds, table.ptrs, table.ints, table.ptrs.shape[0], out, x.stride(0),
        target.stride(0), BLOCK_M=p.block_m, BLOCK_N=p.block_n, BLOCK_K=p.block_k, SPLIT=p.split, DOT=p.dot,
        IEEE=x.dtype == torch.float32, num_warps=p.warps,
    )
    if target is not y:
        y += target.to(y.dtype)
    return y


def add_salient(x: Tensor, segments: Segments, deltas: Mapping[int, PackedCodes], y: Tensor) -> Tensor:
    """``y[rows of e] += x[rows of e][:, salient_idx_e] @ salient_cols_e^T`` for experts with ``k_e > 0``."""
    for j, (e, s, t) in enumerate(segments):
        d = deltas.get(e)
        if e < 0 or s == t or d is None or not supports(d) or not d.k:
            continue
        rows = segments.rows(j).to(x.device)
        xs = x.index_select(0, rows).float().index_select(1, d.salient_idx)
        y.index_add_(0, rows, (xs @ d.salient_cols.T).to(y.dtype))
    return y


@functools.cache
def _kernel():  # noqa: ANN202 - a triton.JITFunction; imported on first use so that importing needs no Triton
    from meswitch.engine.kernels.sgmv_kernel import sgmv

    return sgmv
