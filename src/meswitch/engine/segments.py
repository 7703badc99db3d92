"""Group the rows of a multi-expert batch by expert (the segment layout of Punica's SGMV).

Shapes: ``T`` rows (one row = one token position of one sequence), ``expert_ids: [T]`` with
``-1`` meaning "base model only, no delta". A stable sort by expert id gives ``order: int64 [T]``;
in sorted order the rows of each expert are contiguous, segment ``j`` being sorted rows
``[starts[j], ends[j])`` of expert ``experts[j]``. In plain PyTorch::

    xs = x[order]                    # gather: [T, ...] in segment order
    y = torch.empty_like(ys); y[order] = ys   # scatter: back to batch order
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

BASE_ONLY = -1  # expert id of rows that get no delta


@dataclass(frozen=True, eq=False)
class Segments:
    """Rows of a batch grouped by expert.

    ``order: int64 [T]`` (sorted position -> batch row, stable), ``inverse: int64 [T]`` (batch row
    -> sorted position, ``inverse[order] = arange(T)``), ``starts/ends/experts``: one entry per
    segment, ascending expert id, no empty segments when built by :meth:`from_ids`.
    ``expert_ids`` keeps the per-row ids in batch order.
    """

    order: Tensor
    inverse: Tensor
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    experts: tuple[int, ...]
    expert_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        t = len(self.expert_ids)
        if (
            self.order.shape != (t,)
            or self.inverse.shape != (t,)
            or self.order.dtype != torch.int64
            or self.inverse.dtype != torch.int64
        ):
            raise ValueError(
                f"order and inverse must be int64 [T]=[{t}], got {self.order.dtype} {tuple(self.order.shape)} "
                f"and {self.inverse.dtype} {tuple(self.inverse.shape)}"
            )
        if not len(self.starts) == len(self.ends) == len(self.experts):
            raise ValueError(
                f"starts, ends and experts must have one entry per segment, got "
                f"{len(self.starts)}, {len(self.ends)} and {len(self.experts)}"
            )
        edge, in_order = 0, [self.expert_ids[i] for i in self.order.tolist()]
        for e, s, stop in zip(self.experts, self.starts, self.ends, strict=True):
            if s != edge or stop < s:
                raise ValueError(
                    f"segments must tile [0, {t}) in order, got starts {self.starts} ends {self.ends}"
                )
            if any(i != e for i in in_order[s:stop]):
                raise ValueError(f"sorted rows [{s}, {stop}) are not all expert {e}: {in_order[s:stop]}")
            edge = stop
        if edge != t:
            raise ValueError(f"segments cover {edge} rows, the batch has {t}")
        order, inverse = self.order.tolist(), self.inverse.tolist()  # checked in Python: no ATen calls per step
        if sorted(order) != list(range(t)) or any(order[i] != j for j, i in enumerate(inverse)):
            raise ValueError("inverse must be the inverse permutation of order")

    @classmethod
    def from_ids(cls, expert_ids: Sequence[int] | Tensor) -> Segments:
        """Stable grouping of ``expert_ids: [T]`` (ints >= -1; -1 = base only)."""
        ids = [int(i) for i in (expert_ids.tolist() if isinstance(expert_ids, Tensor) else expert_ids)]
        if any(i < BASE_ONLY for i in ids):
            raise ValueError(f"expert ids must be >= {BASE_ONLY} ({BASE_ONLY} = base only), got {min(ids)}")
        t = len(ids)
        keys = torch.tensor(ids, dtype=torch.int64)
        _, order = torch.sort(keys, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(t)
        experts, counts = torch.unique_consecutive(keys[order], return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0, *ends[:-1]] if ends else []
        return cls(order, inverse, tuple(starts), tuple(ends), tuple(experts.tolist()), tuple(ids))

    @property
    def num_rows(self) -> int:
        """``T``, the batch size in rows."""
        return len(self.expert_ids)

    @cached_property
    def is_sorted(self) -> bool:
        """True when the batch is already in segment order (``order == arange(T)``): no gather needed."""
        return self.order.tolist() == list(range(self.num_rows))

    @property
    def single_expert(self) -> int | None:
        """The one expert id (possibly -1) of every row, or None for a mixed or empty batch."""
        return self.experts[0] if len(self.experts) == 1 else None

    def __len__(self) -> int:
        return len(self.experts)

    @cached_property
    def bounds(self) -> Tensor:
        """``int32 [S, 3]``: (start, end, expert) per segment, on ``order``'s device (built once per batch)."""
        rows = list(zip(self.starts, self.ends, self.experts, strict=True))
        return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3).to(self.order.device)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        """``(expert, start, end)`` per segment, in sorted-row coordinates."""
        return iter(zip(self.experts, self.starts, self.ends, strict=True))

    def to(self, device: torch.device | str) -> Segments:
        """The same grouping with ``order``/``inverse`` on ``device`` (move once per batch, not per layer); itself
        when they are there already."""
        if self.order.device == torch.device(device):
            return self
        return replace(self, order=self.order.to(device), inverse=self.inverse.to(device))

    def rows(self, j: int) -> Tensor:
        """Batch rows of segment ``j``: ``int64 [ends[j] - starts[j]]`` (``order[starts[j]:ends[j]]``)."""
        return self.order[self.starts[j] : self.ends[j]]

    def gather(self, x: Tensor) -> Tensor:
        """``x: [T, ...]`` in batch order -> ``x[order]: [T, ...]`` in segment order (``x`` itself if sorted)."""
        self._check_rows(x, "x")
        return x if self.is_sorted else x.index_select(0, self.order.to(x.device))

    def scatter(self, ys: Tensor) -> Tensor:
        """Inverse of :meth:`gather`: ``ys: [T, ...]`` in segment order -> ``y`` with ``y[order] = ys``."""
        self._check_rows(ys, "ys")
        return ys if self.is_sorted else ys.index_select(0, self.inverse.to(ys.device))

    def _check_rows(self, x: Tensor, name: str) -> None:
        if x.dim() < 1 or x.shape[0] != self.num_rows:
            raise ValueError(f"{name} must have T={self.num_rows} rows, got shape {tuple(x.shape)}")
