"""A slot-based key/value cache for continuous batching.

Shapes: ``L`` layers, ``N`` slots (one per running sequence), ``H_kv`` key/value heads, ``C`` the
current capacity in positions, ``hd`` head dim. ``kv[l]``: ``[2, N, H_kv, C, hd]``, keys then values of
layer ``l`` in one tensor; ``k[l]``, ``v[l]``: its two halves, ``[N, H_kv, C, hd]`` views; ``rows[l]``: the same
as ``[2 * N * H_kv * C, hd]``, one row per (k/v, slot, head, position), so that a decode step writes every
key and value of a layer with one indexed copy (:meth:`token_rows`, :meth:`write_rows`). A sequence
owns one slot for its lifetime; its cached length is ``lengths[slot]``. Capacity grows by doubling
(copying) when a sequence outgrows it, up to ``max_len``; slots are handed out lowest first so the
running sequences usually sit in a prefix ``[0, n)`` that decode attention can view without copying.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class KVCache:
    """Keys and values of every running sequence, per layer."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        initial: int = 256,
    ) -> None:
        if min(layers, slots, kv_heads, head_dim, max_len) <= 0:
            raise ValueError("layers, slots, kv_heads, head_dim and max_len must be positive")
        self.max_len, self.slots = max_len, slots
        cap = min(initial, max_len)
        shape = (2, slots, kv_heads, cap, head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []
        self.rows: list[Tensor] = []
        self._halves()
        self.lengths = [0] * slots
        self._free = list(range(slots))

    def _halves(self) -> None:
        """``k``, ``v``, ``rows``: the views of ``kv`` (again after ``kv`` was replaced)."""
        self.k = [kv[0] for kv in self.kv]
        self.v = [kv[1] for kv in self.kv]
        self.rows = [kv.view(-1, kv.shape[-1]) for kv in self.kv]

    @property
    def capacity(self) -> int:
        return self.kv[0].shape[3]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def allocate(self) -> int:
        """A free slot (the lowest), with length 0. IndexError when all are taken."""
        if not self._free:
            raise IndexError("no free KV-cache slot")
        self._free.sort()
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions per slot (double the capacity until it fits)."""
        if length > self.max_len:
            raise ValueError(f"{length} positions exceed the cache's max_len {self.max_len}")
        cap = self.capacity
        if length <= cap:
            return
        while cap < length:
            cap = min(2 * cap, self.max_len)
        for i, t in enumerate(self.kv):
            grown = t.new_zeros(*t.shape[:3], cap, t.shape[4])
            grown[:, :, :, : t.shape[3]] = t
            self.kv[i] = grown
        self._halves()

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> None:
        """Store ``k, v: [n, H_kv, hd]`` at positions ``[start, start + n)`` of ``slot``."""
        n = k.shape[0]
        self.k[layer][slot, :, start : start + n] = k.transpose(0, 1)
        self.v[layer][slot, :, start : start + n] = v.transpose(0, 1)

    def write_tokens(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one position per row: ``slots, positions: int64 [S]``, ``k, v: [S, H_kv, hd]``."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v

    def token_rows(self, slots: Sequence[int], positions: Sequence[int]) -> Tensor:
        """``int64 [S, 2, H_kv]``: the row of ``rows[l]`` that takes token ``i``'s key (``[i, 0, h]``) and value
        (``[i, 1, h]``) of head ``h``, for tokens at ``positions`` of ``slots`` (valid until the capacity grows)."""
        _, n, kvh, cap, _ = self.kv[0].shape
        return torch.tensor([[[((part * n + s) * kvh + h) * cap + p for h in range(kvh)] for part in (0, 1)]
                             for s, p in zip(slots, positions, strict=True)], dtype=torch.int64,
                            device=self.kv[0].device).view(len(slots), 2, kvh)

    def write_rows(self, layer: int, index: Tensor, kv: Tensor) -> None:
        """Store keys and values side by side, ``kv: [S, 2, H_kv, hd]`` (a view of a fused projection's output may
        do), at the rows ``index`` (:meth:`token_rows`) of layer ``layer``: :meth:`write_tokens` in one copy."""
        self.rows[layer].index_put_((index,), kv)
