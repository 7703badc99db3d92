"""Expert residency: which experts' deltas live in the serving model, within a memory budget.

Two tiers, as in vLLM's adapter manager: the **resident** tier holds each loaded expert's packed
deltas (bytes counted against ``max_resident_bytes``; least recently used unpinned experts leave
first, back to the store on disk); the **merged** tier keeps a full ``W_base + delta`` copy of the
linear weights for up to ``max_merged`` hot experts, so a batch of one of them runs at the base
model's speed (the engine decides when: :meth:`ExpertPool.merge`; mixed batches never use merged
weights, which would read one full weight copy per expert). Experts in use by a running sequence are pinned (reference counted) and never
evicted; :meth:`ExpertPool.pin` pins one for good.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from meswitch.deltas import DeltaFormatError, DenseDelta, decode
from meswitch.engine.backends.forms import DenseForm
from meswitch.engine.errors import BudgetError, UnknownModelError, UnsupportedModelError
from meswitch.engine.layers import ExpertLinear
from meswitch.engine.model import ServingModel
from meswitch.store import DeltaStore


@dataclass
class ExpertStats:
    """Counters of one expert: loads from disk, their times, cache hits, evictions, merges."""

    loads: int = 0
    load_ms: list[float] = field(default_factory=list)
    hits: int = 0
    evictions: int = 0
    merges: int = 0
    merge_ms: list[float] = field(default_factory=list)
    resident_bytes: int = 0
    merged_bytes: int = 0


class ExpertPool:
    """Loads, pins and evicts experts of ``store`` into ``model`` (module docstring)."""

    def __init__(
        self,
        store: DeltaStore,
        model: ServingModel,
        max_resident_bytes: int | None = None,
        max_merged: int = 0,
        verify: bool = True,
    ) -> None:
        self.store, self.model = store, model
        self.names = store.experts
        self.index = {name: i for i, name in enumerate(self.names)}
        self.max_resident_bytes, self.max_merged = max_resident_bytes, max_merged
        self.backend, self.verify = model.backend, verify
        self._linears = dict(model.linears())
        self._norms = dict(model.norms())
        self._resident: OrderedDict[int, int] = OrderedDict()  # idx -> bytes, least recently used first
        self._merged: OrderedDict[int, int] = OrderedDict()
        self._refs: dict[int, int] = {}
        self._pinned: set[int] = set()
        self.stats = {name: ExpertStats() for name in self.names}
        if max_resident_bytes is not None:
            biggest = max((store.total_bytes(n) for n in self.names), default=0)
            if max_resident_bytes < biggest:
                raise BudgetError(
                    f"max_resident_bytes={max_resident_bytes} is smaller than one expert: the largest "
                    f"stored expert takes {biggest} bytes on disk"
                )

    # ---- queries -----------------------------------------------------------------------------

    def lookup(self, name: str) -> int:
        """The index of expert ``name``; :class:`UnknownModelError` if the store has none."""
        if name not in self.index:
            raise UnknownModelError(name, self.names)
        return self.index[name]

    def resident(self) -> list[str]:
        return [self.names[i] for i in self._resident]

    def merged(self) -> list[str]:
        return [self.names[i] for i in self._merged]

    def resident_bytes(self) -> int:
        return sum(self._resident.values())

    def merged_bytes(self) -> int:
        return sum(self._merged.values())

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: budget, resident and merged experts and bytes, per-expert counters."""
        return {
            "max_resident_bytes": self.max_resident_bytes,
            "max_merged": self.max_merged,
            "resident": self.resident(),
            "merged": self.merged(),
            "pinned": sorted(self.names[i] for i in self._pinned),
            "resident_bytes": self.resident_bytes(),
            "merged_bytes": self.merged_bytes(),
            "experts": {n: asdict(s) for n, s in self.stats.items()},
        }

    # ---- use by the scheduler ----------------------------------------------------------------

    def acquire(self, idx: int) -> bool:
        """Make expert ``idx`` resident and take a reference; False if the budget is full of pinned experts."""
        if idx in self._resident:
            self.stats[self.names[idx]].hits += 1
            self._resident.move_to_end(idx)
        else:
            if not self._make_room(self._estimate(idx)):
                return False
            self.load(idx)
            self._make_room(0, keep=idx)  # the estimate may have been low
        self._refs[idx] = self._refs.get(idx, 0) + 1
        return True

    def release(self, idx: int) -> None:
        """Drop one reference taken by :meth:`acquire`."""
        left = self._refs.get(idx, 0) - 1
        if left < 0:
            raise ValueError(f"expert {self.names[idx]!r} released more often than acquired")
        self._refs[idx] = left

    def pin(self, name: str) -> None:
        """Load expert ``name`` and keep it resident until :meth:`unpin`."""
        idx = self.lookup(name)
        if idx not in self._resident:
            if not self._make_room(self._estimate(idx)):
                raise BudgetError(f"cannot pin {name!r}: the budget is full of pinned or busy experts")
            self.load(idx)
        self._pinned.add(idx)

    def unpin(self, name: str) -> None:
        self._pinned.discard(self.lookup(name))

    # ---- loading and eviction ----------------------------------------------------------------

    def load(self, idx: int) -> None:
        """Read expert ``idx`` from the store into the model's layers (timed in ``stats``)."""
        name = self.names[idx]
        t0 = time.perf_counter()
        layers, entry = self.store.load_expert(name, verify=self.verify)
        placed = self._place(idx, layers, entry["layers"])
        st = self.stats[name]
        st.loads += 1
        st.load_ms.append((time.perf_counter() - t0) * 1e3)
        st.resident_bytes = placed
        self._resident[idx] = placed

    def evict(self, idx: int) -> None:
        """Remove expert ``idx`` from the model (it stays in the store); refused while pinned or in use."""
        if self._refs.get(idx, 0) > 0 or idx in self._pinned:
            raise BudgetError(f"expert {self.names[idx]!r} is in use or pinned and cannot be evicted")
        for mod in (*self._linears.values(), *self._norms.values(), self.model.embed):
            mod.drop(idx)
        self._resident.pop(idx, None)
        self._merged.pop(idx, None)
        st = self.stats[self.names[idx]]
        st.evictions += 1
        st.resident_bytes = st.merged_bytes = 0

    def _estimate(self, idx: int) -> int:
        """Bytes expert ``idx`` will take in memory: its file size times the in-memory/file ratio seen so far."""
        file_bytes = {i: self.store.total_bytes(self.names[i]) for i in self._resident}
        ratio = sum(self._resident.values()) / max(1, sum(file_bytes.values())) if file_bytes else 1.0
        return int(self.store.total_bytes(self.names[idx]) * ratio)

    def _make_room(self, need: int, keep: int | None = None) -> bool:
        if self.max_resident_bytes is None:
            return True
        while self.resident_bytes() + need > self.max_resident_bytes:
            victim = next((i for i in self._resident
                           if not self._refs.get(i) and i not in self._pinned and i != keep), None)
            if victim is None:
                return False
            self.evict(victim)
        return True

    def merge(self, idx: int) -> None:
        """Give resident expert ``idx`` merged weights (dropping the least recently merged beyond ``max_merged``)."""
        if self.max_merged <= 0 or idx not in self._resident:
            return
        if idx in self._merged:
            self._merged.move_to_end(idx)
            return
        while len(self._merged) >= self.max_merged:
            old, _ = self._merged.popitem(last=False)
            for mod in self._linears.values():
                mod.merged.pop(old, None)
            self.stats[self.names[old]].merged_bytes = 0
        t0 = time.perf_counter()
        size = sum(mod.merge(idx) for mod in self._linears.values() if idx in mod.deltas)
        st = self.stats[self.names[idx]]
        st.merges += 1
        st.merge_ms.append((time.perf_counter() - t0) * 1e3)
        st.merged_bytes = size
        self._merged[idx] = size

    def _place(self, idx: int, layers: dict[str, dict[str, torch.Tensor]], metas: dict[str, dict[str, Any]]) -> int:
        """Decode and check every stored layer against the model, then attach them all; returns bytes held."""
        name, device = self.names[idx], self.model.device
        staged: list[tuple[Any, Any]] = []
        for layer, fields in layers.items():
            try:
                record = decode(fields, metas[layer])
            except DeltaFormatError as exc:
                raise UnsupportedModelError(f"expert {name!r}, layer {layer!r}: {exc}") from exc
            if not isinstance(record, DenseDelta):
                mod = self._linears.get(layer)
                if mod is None:
                    raise UnsupportedModelError(f"expert {name!r}: stored delta {layer!r} is no linear layer of the base")
                if tuple(record.shape) != mod.shape:
                    raise UnsupportedModelError(f"expert {name!r}, layer {layer!r}: delta is {list(record.shape)}, "
                                                f"the base weight {list(mod.shape)}")
                staged.append((mod, self.backend.prepare(record)))
                continue
            d = record.delta.to(device)
            owner = layer.removesuffix(".weight")
            if owner in self._linears and d.dim() == 2:  # a linear layer's delta kept dense (lossless)
                if tuple(d.shape) != self._linears[owner].shape:
                    raise UnsupportedModelError(f"expert {name!r}: delta {layer!r} is {list(d.shape)}, the base "
                                                f"weight {list(self._linears[owner].shape)}")
                staged.append((self._linears[owner], DenseForm(d)))
                continue
            target = self._dense_target(name, layer)
            if tuple(d.shape) != tuple(_param_shape(target, layer)):
                raise UnsupportedModelError(
                    f"expert {name!r}: delta {layer!r} is {list(d.shape)}, the base has {list(_param_shape(target, layer))}"
                )
            staged.append((target, d))
        held = 0
        for target, d in staged:
            if isinstance(target, ExpertLinear):
                target.set_delta(idx, d)
                held += d.nbytes()
            elif target is self.model.embed:
                target.deltas[idx] = d
                held += d.numel() * d.element_size()
                if self.model.tied:  # the output head is the same matrix
                    self.model.lm_head.set_delta(idx, DenseForm(d))
            else:
                target.deltas[idx] = d.float()
                held += d.numel() * 4
        return held

    def _dense_target(self, expert: str, layer: str) -> Any:
        if layer in self._norms:
            return self._norms[layer]
        if layer == "model.embed_tokens.weight":
            return self.model.embed
        if layer == "lm_head.weight" and not self.model.tied:
            return self.model.lm_head
        raise UnsupportedModelError(
            f"expert {expert!r}: the engine cannot apply a delta to {layer!r} (norms, embeddings, the output "
            "head, linear layers and the biases of unfused ones are supported)"
        )


def _param_shape(target: Any, layer: str) -> tuple[int, ...]:
    if hasattr(target, "weight") and isinstance(target.weight, torch.Tensor):
        return tuple(target.weight.shape)
    return tuple(target.base.weight.shape)
