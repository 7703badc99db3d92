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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meswitch.engine import sgmv_triton
from meswitch.engine.delta_linear import delta_matmul
from meswitch.engine.segments import Segments


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

    def forward(self, x: Tensor, segments: Segments) -> Tensor:
        """``x: [T, in]`` -> ``[T, out]``; rows of experts with no delta in this layer get the base."""
        single = segments.single_expert
        if single is not None and (single < 0 or single in self.merged or single not in self.deltas):
            w = self.merged.get(single, self.base.weight)
            return F.linear(x, w, self.base.bias)
        # Mixed batch: one pass over the base weight for every row, then each expert's delta on its
        # rows. Merged weights are not used here: they would read one full weight copy per expert.
        y = self.base(x)
        present = {e: self.deltas[e] for e in segments.experts if e in self.deltas}
        if present and sgmv_triton.usable(x):
            sgmv_triton.sgmv_delta(x, segments, self.expert_table(), y)
            sgmv_triton.add_salient(x, segments, present, y)
            present = {e: d for e, d in present.items() if not sgmv_triton.supports(d)}
        if present:
            delta_matmul(x, _restrict(segments, present), present, y)
        return y

    def expert_table(self) -> sgmv_triton.ExpertTable:
        """The Triton kernel's table of this layer's deltas, rebuilt when they changed."""
        if self._table is None or not self._table.matches(self.deltas):
            self._table = sgmv_triton.ExpertTable.build(self.deltas, self.base.weight.device)
        return self._table


def _restrict(segments: Segments, present: dict[int, Delta]) -> Segments:
    """``segments`` with rows of experts absent from ``present`` relabelled base-only (-1)."""
    if all(e < 0 or e in present for e in segments.experts):
        return segments
    return Segments.from_ids([e if e in present else -1 for e in segments.expert_ids])


class ExpertNorm(nn.Module):
    """RMSNorm with per-expert weight deltas: ``y[i] = rms_normalize(x[i]) * (w + dw_{e_i})``.

    ``x: [T, D]`` -> ``[T, D]``; ``dw`` float ``[D]``, from a dense stored delta of the norm weight.
    """

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.deltas: dict[int, Tensor] = {}

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    def forward(self, x: Tensor, segments: Segments, expert_rows: Tensor) -> Tensor:
        """``expert_rows: int64 [T]``, the expert index of each row (``segments.expert_ids`` as a tensor)."""
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = self.weight * normed
        for e, s, t in segments:
            if e in self.deltas:
                if segments.is_sorted:  # the engine's steps: each expert's rows are one slice, no masks
                    y[s:t].addcmul_(normed[s:t], self.deltas[e].to(y.dtype))
                else:
                    rows = expert_rows == e
                    y[rows] += normed[rows] * self.deltas[e].to(y.dtype)
        return y


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
