"""A slot-based key/value cache for continuous batching.

Shapes: ``L`` layers, ``N`` slots (one per running sequence), ``H_kv`` key/value heads, ``C`` the
current capacity in positions, ``hd`` head dim. ``k[l]``, ``v[l]``: ``[N, H_kv, C, hd]``. A sequence
owns one slot for its lifetime; its cached length is ``lengths[slot]``. Capacity grows by doubling
(copying) when a sequence outgrows it, up to ``max_len``; slots are handed out lowest first so the
running sequences usually sit in a prefix ``[0, n)`` that decode attention can view without copying.
"""

from __future__ import annotations

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
        shape = (slots, kv_heads, cap, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * slots
        self._free = list(range(slots))

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

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
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                grown = t.new_zeros(t.shape[0], t.shape[1], cap, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[i] = grown

    def write(self, layer: int, slot: int, start: int, k: Tensor, v: Tensor) -> None:
        """Store ``k, v: [n, H_kv, hd]`` at positions ``[start, start + n)`` of ``slot``."""
        n = k.shape[0]
        self.k[layer][slot, :, start : start + n] = k.transpose(0, 1)
        self.v[layer][slot, :, start : start + n] = v.transpose(0, 1)

    def write_tokens(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Store one position per row: ``slots, positions: int64 [S]``, ``k, v: [S, H_kv, hd]``."""
        self.k[layer][slots, :, positions] = k
        self.v[layer][slots, :, positions] = v
