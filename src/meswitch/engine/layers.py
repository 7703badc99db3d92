"""Layers of the serving model that hold per-expert deltas beside the shared base weights.

Shapes: ``T`` rows of a step (one row = one token of one sequence, sequences of different experts
mixed), ``in``/``out`` a linear layer's features, ``D`` hidden size, ``V`` vocabulary. Every layer
takes the step's :class:`~meswitch.engine.segments.Segments` (row -> expert index, ``-1`` = base).

:class:`ExpertLinear` computes, for row ``i`` of expert ``e``::

    y[i] = x[i] @ (W_base + delta_e)^T + b        # delta_{-1} = 0

as ``base(x) + delta.matmul(x)`` per expert segment from the packed delta
(:class:`~meswitch.engine.delta_linear.PackedDelta`, whatever it keeps resident), or, when every
row belongs to one expert that has it, one matmul with a cached merged weight ``W_base + delta_e``.
On CUDA with Triton, a mixed batch's packed deltas go through one kernel launch per layer that reads
the stored codes directly (:mod:`~meswitch.engine.sgmv_triton`); other deltas keep the PyTorch path.
On CPU, a sorted step gives every expert's low-bit delta its slice of rows in one call of the
low-bit kernel (:mod:`~meswitch.engine.lowbit_cpu`); int4 deltas (:mod:`~meswitch.engine.int4`,
where that kernel is unavailable, and sign2d's) take one call per expert on the rows converted to
bf16 once per layer. Deltas with salient columns take one call per expert as well, their fp16
columns beside it (:meth:`~meswitch.engine.delta_linear.PackedDelta.matmul`).

:class:`SharedInputLinears` runs layers that read one input (q/k/v, gate/up) as one: a stacked
base weight (the layers' parameters become views of it) and each expert's deltas stacked, so that
the group's deltas take one kernel call. A decode step on this project's 2-core CPU is made of a few hundred small
calls; fewer calls is what brought a mixed batch closer to the base (docs/engine.md).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meswitch.engine import int4, lowbit_cpu, sgmv_triton
from meswitch.engine.delta_linear import delta_matmul
from meswitch.engine.int4 import Int4Delta
from meswitch.engine.lowbit_cpu import LowbitDelta
from meswitch.engine.segments import Segments

Fused = Int4Delta | LowbitDelta  # a delta's form for a fused CPU kernel


class Delta(Protocol):
    """What a linear layer needs of an expert's delta."""

    shape: tuple[int, int]

    def matmul(self, x: Tensor) -> Tensor: ...  # [n, in] -> float32 [n, out]

    def dense(self) -> Tensor: ...  # float32 [out, in]

    def nbytes(self) -> int: ...


@dataclass(frozen=True, eq=False)
class DenseDelta:
    """A delta stored densely (16 bit): ``delta: [out, in]``; computes in float32."""

    delta: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.delta.shape)  # type: ignore[return-value]

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> ``x @ delta^T: float32 [n, out]``."""
        return x.float() @ self.delta.float().T

    def dense(self) -> Tensor:
        return self.delta.float()

    def nbytes(self) -> int:
        return self.delta.numel() * self.delta.element_size()


class ExpertLinear(nn.Module):
    """A base ``nn.Linear`` plus per-expert deltas and optional merged weights (module docstring)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.deltas: dict[int, Delta] = {}
        self.merged: dict[int, Tensor] = {}
        self._table: sgmv_triton.ExpertTable | None = None  # the kernel's view of self.deltas
        # expert -> (the deltas it was built from, fused forms of the layers sharing this input, stacked)
        self.fused: dict[int, tuple[tuple[Delta | None, ...], Fused | None]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.out_features, self.base.in_features)

    def merge(self, idx: int) -> int:
        """Cache ``W_base + delta_idx`` for expert ``idx``; returns the bytes it takes."""
        w = self.base.weight.detach()
        self.merged[idx] = (w.float() + self.deltas[idx].dense()).to(w.dtype)
        return self.merged[idx].numel() * self.merged[idx].element_size()

    def drop(self, idx: int) -> None:
        """Forget expert ``idx`` (its delta and any merged weight)."""
        self.deltas.pop(idx, None)
        self.merged.pop(idx, None)
        self.fused.pop(idx, None)

    def whole_batch_weight(self, segments: Segments) -> Tensor | None:
        """The one weight every row uses when there is one (the base's or a merged one), else None."""
        single = segments.single_expert
        if single is not None and (single < 0 or single in self.merged or single not in self.deltas):
            return self.merged.get(single, self.base.weight)
        return None

    def forward(self, x: Tensor, segments: Segments) -> Tensor:
        """``x: [T, in]`` -> ``[T, out]``; rows of experts with no delta in this layer get the base."""
        w = self.whole_batch_weight(segments)
        if w is not None:
            return F.linear(x, w, self.base.bias)
        # Mixed batch: one pass over the base weight for every row, then each expert's delta on its
        # rows. Merged weights are not used here: they would read one full weight copy per expert.
        y = self.base(x)
        self.add_deltas(x, segments, y)
        return y

    def add_deltas(self, x: Tensor, segments: Segments, y: Tensor) -> None:
        """``y[i] += x[i] @ delta_{e_i}^T`` for every row whose expert has a delta here (``y: [T, out]``)."""
        present = {e: self.deltas[e] for e in segments.experts if e in self.deltas}
        if not present:
            return
        if sgmv_triton.usable(x):
            sgmv_triton.sgmv_delta(x, segments, self.expert_table(), y)
            sgmv_triton.add_salient(x, segments, present, y)
            present = {e: d for e, d in present.items() if not sgmv_triton.supports(d)}
        elif segments.is_sorted:  # the engine's steps: each expert's rows are one slice
            left = _add_fused_rows(x, segments, lambda e: _whole(_unit_fused(present.get(e))), y)
            present = {e: present[e] for e in left if e in present}
        if present:
            delta_matmul(x, _restrict(segments, present), present, y)

    def fused_with(self, e: int, mods: Sequence[ExpertLinear]) -> Int4Delta | None:
        """Expert ``e``'s int4 deltas of ``mods`` (this layer first, all reading one input) stacked along ``out``.

        Built on first use and kept on this layer (so that dropping the expert here frees it) until
        the expert is dropped or any of its deltas is replaced; the layers' own int4 forms become
        views of it, so the codes are held once. None unless every layer holds a unit-scale int4
        delta of ``e``. (Low-bit deltas need no stacking: one kernel call takes each layer's
        columns as its own form.)
        """
        parts = tuple(m.deltas.get(e) for m in mods)
        hit = self.fused.get(e)
        if hit is not None and _same_objects(hit[0], parts):
            return hit[1]
        forms = [_unit_fused(d) for d in parts]
        stacked = int4.concat(forms) if all(isinstance(f, Int4Delta) for f in forms) else None  # type: ignore[arg-type]
        if stacked is None:
            self.fused[e] = (parts, None)
            return None
        for d, view in zip(parts, stacked[1], strict=True):
            d.use_fused(view)  # type: ignore[union-attr]
        self.fused[e] = (parts, stacked[0])
        return stacked[0]

    def expert_table(self) -> sgmv_triton.ExpertTable:
        """The Triton kernel's table of this layer's deltas, rebuilt when they changed."""
        if self._table is None or not self._table.matches(self.deltas):
            self._table = sgmv_triton.ExpertTable.build(self.deltas, self.base.weight.device)
        return self._table


class SharedInputLinears(nn.Module):
    """Linear layers that read the same input (q/k/v; gate/up) run as one: ``forward(x, segments)``
    equals ``[m(x, segments) for m in layers]``, with fewer and wider calls.

    The layers' base weights (and biases) are stacked into one ``[sum out, in]`` tensor and the
    layers' own parameters become views of it, so the base is held once and a step makes one base
    matmul for the group. On a sorted CPU step the low-bit deltas of every layer and expert are one
    kernel call (each layer's delta on its columns of the stacked output, each expert's on its
    rows, whatever their bits); int4 deltas are stacked per expert (:meth:`ExpertLinear.fused_with`)
    and take one call per expert. Batches of one
    merged expert, CUDA steps and weights that were moved or replaced since take the layers one by one.
    """

    def __init__(self, layers: Sequence[ExpertLinear]) -> None:
        super().__init__()
        self._layers = tuple(layers)  # not registered: they stay the decoder layer's submodules
        self.widths = [m.shape[0] for m in layers]
        self._columns = [sum(self.widths[:j]) for j in range(len(layers))]  # each layer's first output column
        bases = [m.base for m in layers]
        w0 = bases[0].weight
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        same = all(b.weight.dtype == w0.dtype and b.weight.device == w0.device and b.in_features == bases[0].in_features
                   for b in bases)
        has_bias = [b.bias is not None for b in bases]
        if not same or any(has_bias) != all(has_bias):
            return
        with torch.no_grad():
            self.weight = torch.cat([b.weight.detach() for b in bases])
            for b, part in zip(bases, self.weight.split(self.widths), strict=True):
                b.weight.data = part
            if all(has_bias):
                self.bias = torch.cat([b.bias.detach() for b in bases])  # type: ignore[union-attr]
                for b, part in zip(bases, self.bias.split(self.widths), strict=True):
                    b.bias.data = part  # type: ignore[union-attr]
        self._ptrs = [b.weight.data_ptr() for b in bases]

    def _stacked(self) -> bool:
        """Whether the layers' weights are still the views of :attr:`weight` made at construction."""
        return self.weight is not None and all(
            m.base.weight.data_ptr() == p for m, p in zip(self._layers, self._ptrs, strict=True))

    def forward(self, x: Tensor, segments: Segments) -> list[Tensor]:
        """``x: [T, in]`` -> one ``[T, out_j]`` per layer (column views of one ``[T, sum out]`` output)."""
        layers = self._layers
        if not self._stacked() or sgmv_triton.usable(x):
            return [m(x, segments) for m in layers]
        single = segments.single_expert
        if single is not None and any(single in m.merged for m in layers):
            return [m(x, segments) for m in layers]
        y = F.linear(x, self.weight, self.bias)  # type: ignore[arg-type]
        if single is not None and (single < 0 or all(single not in m.deltas for m in layers)):
            return list(y.split(self.widths, 1))
        rest = _add_fused_rows(x, segments, self._pieces, y) if segments.is_sorted else list(segments.experts)
        ys = list(y.split(self.widths, 1))
        if any(e >= 0 for e in rest):
            only = _restrict(segments, rest)
            for m, part in zip(layers, ys, strict=True):
                m.add_deltas(x, only, part)
        return ys


    def _pieces(self, e: int) -> list[tuple[Fused, int]] | None:
        """Expert ``e``'s whole delta for the group as fused forms and their first output column, or None."""
        if e < 0:
            return None
        forms = [_unit_fused(m.deltas.get(e)) for m in self._layers]
        if all(isinstance(f, LowbitDelta) for f in forms):
            return list(zip(forms, self._columns, strict=True))  # type: ignore[arg-type]
        return _whole(self._layers[0].fused_with(e, self._layers))


def _whole(form: Fused | None) -> list[tuple[Fused, int]] | None:
    """A layer's whole delta as one piece starting at output column 0 (None stays None)."""
    return None if form is None else [(form, 0)]


def _add_fused_rows(x: Tensor, segments: Segments, pieces: Callable[[int], list[tuple[Fused, int]] | None],
                    y: Tensor) -> list[int]:
    """Sorted step: ``y[s:t, c:c + out_f] += x[s:t] @ f^T`` for each ``(f, c)`` in ``pieces(e)`` of each segment.

    ``x: [T, in]``, ``y: [T, N]``. Low-bit forms go through one kernel call for all segments and
    pieces; int4 forms through one call each on the rows converted to bf16 once. Returns the
    experts (``-1`` included) whose segments were left for another path (``pieces(e)`` None).
    """
    xb, left, low = None, [], []
    for e, s, t in segments:
        got = pieces(e)
        if got is None:
            left.append(e)
            continue
        for fused, col in got:
            if isinstance(fused, LowbitDelta):
                low.append((fused, s, t, col))
            else:
                xb = x.to(torch.bfloat16) if xb is None else xb
                # in place on the view: `y[...] += ...` would copy it back too
                y[s:t, col : col + fused.out_features].add_(fused.mm(xb[s:t]))
    if low:
        if y.dtype == torch.float32 and y.stride(1) == 1:
            lowbit_cpu.sgmv(x, y, low)
        else:
            acc = torch.zeros(y.shape, dtype=torch.float32)
            lowbit_cpu.sgmv(x, acc, low)
            y.add_(acc.to(y.dtype))
    return left


def _unit_fused(d: Delta | None) -> Fused | None:
    """``d``'s fused form when one kernel call gives its whole delta (no salient columns, no column scales)."""
    fused = getattr(d, "fused", None)
    return fused if fused is not None and fused.unit_scale and not d.k else None  # type: ignore[union-attr]


def _same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects in order (a cache built from ``a`` still holds for ``b``).

    By identity, not by ``id()``: the cache keeps ``a`` alive, so no object of ``b`` can reuse an address.
    """
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _restrict(segments: Segments, present: Container[int]) -> Segments:
    """``segments`` with rows of experts absent from ``present`` relabelled base-only (-1)."""
    if all(e < 0 or e in present for e in segments.experts):
        return segments
    return Segments.from_ids([e if e in present else -1 for e in segments.expert_ids])


class ExpertNorm(nn.Module):
    """RMSNorm with per-expert weight deltas: ``y[i] = rms_normalize(x[i]) * (w + dw_{e_i})``.

    ``x: [T, D]`` -> ``[T, D]``; ``dw`` float ``[D]``, from a dense stored delta of the norm weight.
    A step with deltas gathers each row's ``w + dw_e`` from a table (one row per expert id, rebuilt
    when the deltas change): three ops per norm however many experts the step holds.
    """

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.deltas: dict[int, Tensor] = {}
        self._table: tuple[tuple[tuple[int, ...], tuple[Tensor, ...]], Tensor] | None = None

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    def table(self, min_rows: int = 0) -> Tensor:
        """``[R, D]`` in the weight's dtype, ``R >= min_rows``: row ``e + 1`` is ``w + dw_e`` (``w`` where
        expert ``e`` has no delta), row 0 is ``w`` (the base)."""
        key = (tuple(self.deltas), tuple(self.deltas.values()))  # the table holds the tensors it was built from
        held = self._table
        if held is None or held[0][0] != key[0] or not _same_objects(held[0][1], key[1]) or held[1].shape[0] < min_rows:
            w = self.weight.detach()
            table = w.float().expand(max(max(self.deltas, default=-1) + 2, min_rows), -1).clone()
            for e, d in self.deltas.items():
                table[e + 1] += d.to(table.device, torch.float32)
            self._table = (key, table.to(w.dtype))
        return self._table[1]

    def forward(self, x: Tensor, segments: Segments, expert_rows: Tensor) -> Tensor:
        """``expert_rows: int64 [T]``, the expert index of each row (``segments.expert_ids`` as a tensor)."""
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if not any(e in self.deltas for e in segments.experts):
            return self.weight * normed
        return normed * self.table(segments.experts[-1] + 2).index_select(0, expert_rows + 1)


class ExpertEmbedding(nn.Module):
    """Token embedding with per-expert dense deltas: ``h[i] = E[ids[i]] + dE_{e_i}[ids[i]]``.

    ``ids: int64 [T]`` -> ``[T, D]``; ``dE``: ``[V, D]`` (16 bit as stored).
    """

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.deltas: dict[int, Tensor] = {}

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    def forward(self, ids: Tensor, segments: Segments, expert_rows: Tensor) -> Tensor:
        h = self.base(ids)
        for e in segments.experts:
            if e in self.deltas:
                rows = expert_rows == e
                h[rows] += self.deltas[e][ids[rows]].to(h.dtype)
        return h
