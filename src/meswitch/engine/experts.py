"""Expert residency: which experts' deltas live in the serving model, within a memory budget.

Two tiers, as in vLLM's adapter manager: the **resident** tier holds each loaded expert's packed
deltas (bytes counted against ``max_resident_bytes``; least recently used unpinned experts leave
first, back to the store on disk); the **merged** tier keeps a full ``W_base + delta`` copy of the
linear weights for up to ``max_merged`` hot experts, so a batch of one of them runs at the base
model's speed (the engine decides when: :meth:`ExpertPool.merge`; mixed batches never use merged
weights, which would read one full weight copy per expert). Experts in use by a running sequence are pinned (reference counted) and never
evicted; :meth:`ExpertPool.pin` pins one for good.

Loading has two halves: :meth:`ExpertPool.stage` reads the file and builds the backend's forms (any
thread), :meth:`ExpertPool.attach` hands them to the model's layers (the engine's thread). A load is
either done at once (:meth:`ExpertPool.acquire`, :meth:`ExpertPool.load`) or started on the background
loader (:meth:`ExpertPool.start_load`, ``engine/loader.py``) with its bytes reserved in the budget, and
attached by :meth:`ExpertPool.poll` between steps, so that reading experts overlaps the forward.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from meswitch.deltas import DeltaFormatError, DenseDelta, decode
from meswitch.engine.backends.forms import DenseForm
from meswitch.engine.errors import BudgetError, UnknownModelError, UnsupportedModelError
from meswitch.engine.layers import ExpertLinear
from meswitch.engine.loader import ExpertLoader
from meswitch.engine.model import ServingModel
from meswitch.store import DeltaStore

RESIDENT, LOADED, LOADING, FULL = "resident", "loaded", "loading", "full"  # ExpertPool.claim's answers


@dataclass
class ExpertStats:
    """Counters of one expert: loads from disk (``background``: on the loader thread), their times (read
    and prepare, plus attach), admissions that found it resident (``hits``) or not (``misses``: absent or
    still loading), evictions, merges."""

    loads: int = 0
    background: int = 0
    load_ms: list[float] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
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
        self.max_loading = 2  # background loads in flight (their reserved bytes count in the budget)
        self._loader: ExpertLoader[Staged] = ExpertLoader(self.stage)
        self._loading: dict[int, tuple[Future[Staged], int]] = {}  # idx -> (its staging, bytes reserved)
        self._failed: dict[int, BaseException] = {}  # background loads that failed, until claimed
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

    def loading(self) -> list[str]:
        """Experts being loaded in the background now."""
        return [self.names[i] for i in self._loading]

    def is_resident(self, idx: int) -> bool:
        return idx in self._resident

    def resident_bytes(self) -> int:
        """Bytes of the resident experts, and those reserved for loads in flight."""
        return sum(self._resident.values()) + sum(b for _, b in self._loading.values())

    def merged_bytes(self) -> int:
        return sum(self._merged.values())

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: budget, resident and merged experts and bytes, per-expert counters."""
        return {
            "max_resident_bytes": self.max_resident_bytes,
            "max_merged": self.max_merged,
            "resident": self.resident(),
            "loading": self.loading(),
            "merged": self.merged(),
            "pinned": sorted(self.names[i] for i in self._pinned),
            "resident_bytes": self.resident_bytes(),
            "merged_bytes": self.merged_bytes(),
            "experts": {n: asdict(s) for n, s in self.stats.items()},
        }

    # ---- use by the scheduler ----------------------------------------------------------------

    def acquire(self, idx: int) -> bool:
        """Make expert ``idx`` resident and take a reference; False if the budget is full of pinned experts.

        Loads on the calling thread, or waits for the background load of ``idx`` already in flight."""
        got = self.claim(idx, wait=True)
        if got in (RESIDENT, LOADED):
            self.note(idx, hit=got == RESIDENT)
        return got in (RESIDENT, LOADED)

    def claim(self, idx: int, wait: bool, protect: Collection[int] = ()) -> str:
        """Take a reference on expert ``idx`` for a request being admitted; says how it went:

        - ``RESIDENT``: it was resident; ``LOADED``: it was loaded now (``wait``: on this thread, or the
          background load in flight waited for); both take a reference;
        - ``LOADING``: not resident, its background load is in flight (started now if there was room and
          the loader had fewer than ``max_loading`` loads; ``wait`` False);
        - ``FULL``: no room: the budget is full of busy or pinned experts (and ``protect``, for a
          background load).

        Raises the error of a load of ``idx`` that failed (in the background, or now).
        """
        self.poll()
        if idx in self._failed:
            raise self._failed.pop(idx)
        got = RESIDENT
        if idx in self._resident:
            self._resident.move_to_end(idx)
        elif idx in self._loading:
            if not wait:
                return LOADING
            self._land(idx, block=True)
            got = LOADED
        elif wait:
            if not self._make_room(self._estimate(idx)):
                return FULL
            self.load(idx)
            self._make_room(0, keep=idx)  # the estimate may have been low
            got = LOADED
        elif len(self._loading) >= self.max_loading:
            return LOADING  # the loader is busy: asked again at the next step
        else:
            return LOADING if self.start_load(idx, protect) else FULL
        self._refs[idx] = self._refs.get(idx, 0) + 1
        return got

    def note(self, idx: int, hit: bool) -> None:
        """Count an admission of expert ``idx``: ``hit`` if it found the expert resident without waiting."""
        st = self.stats[self.names[idx]]
        if hit:
            st.hits += 1
        else:
            st.misses += 1

    def start_load(self, idx: int, protect: Collection[int] = ()) -> bool:
        """Start loading expert ``idx`` on the background loader, its estimated bytes reserved in the
        budget (evicting least recently used experts that are idle, unpinned and not in ``protect``).
        True if it is resident or loading now; False if there is no room."""
        if idx in self._resident or idx in self._loading:
            return True
        need = self._estimate(idx)
        if not self._make_room(need, protect=protect):
            return False
        self._loading[idx] = (self._loader.submit(idx), need)
        self.stats[self.names[idx]].background += 1
        return True

    def poll(self) -> None:
        """Attach every background load that has finished (engine thread); a failed one is kept for
        :meth:`claim` to raise."""
        for idx in [i for i, (fut, _) in self._loading.items() if fut.done()]:
            self._land(idx, block=False)

    def failed(self) -> list[int]:
        """Experts whose background load failed and whose error no request has taken yet."""
        return list(self._failed)

    def claim_error(self, idx: int) -> BaseException:
        """The error of expert ``idx``'s failed background load, taken (a later request loads it again)."""
        return self._failed.pop(idx)

    def _land(self, idx: int, block: bool) -> None:
        fut, _ = self._loading[idx]
        try:
            staged = fut.result() if block else fut.result(0)
        except BaseException as exc:  # noqa: BLE001 - the expert's requests fail with it, the engine goes on
            del self._loading[idx]
            if block:
                raise
            self._failed[idx] = exc
            return
        del self._loading[idx]
        self.attach(idx, staged)
        self._make_room(0, keep=idx)  # the estimate may have been low

    def release(self, idx: int) -> None:
        """Drop one reference taken by :meth:`acquire`."""
        left = self._refs.get(idx, 0) - 1
        if left < 0:
            raise ValueError(f"expert {self.names[idx]!r} released more often than acquired")
        self._refs[idx] = left
        if not left:
            self._make_room(0)  # a load made while every other expert was busy may have overshot the budget

    def pin(self, name: str) -> None:
        """Load expert ``name`` and keep it resident until :meth:`unpin`."""
        idx = self.lookup(name)
        if idx in self._loading:
            self._land(idx, block=True)
        if idx not in self._resident:
            if not self._make_room(self._estimate(idx)):
                raise BudgetError(f"cannot pin {name!r}: the budget is full of pinned or busy experts")
            self.load(idx)
        self._pinned.add(idx)

    def unpin(self, name: str) -> None:
        self._pinned.discard(self.lookup(name))

    # ---- loading and eviction ----------------------------------------------------------------

    def load(self, idx: int) -> None:
        """Read expert ``idx`` from the store into the model's layers, on this thread (timed in ``stats``)."""
        self.attach(idx, self.stage(idx))

    def stage(self, idx: int) -> Staged:
        """Read expert ``idx``'s file and build its forms, checked against the model, without touching the
        model (safe on any thread: the background loader calls it)."""
        t0 = time.perf_counter()
        layers, entry = self.store.read_expert(self.names[idx], verify=self.verify)
        items, nbytes = self._stage(idx, layers, entry["layers"])
        return Staged(items, nbytes, (time.perf_counter() - t0) * 1e3)

    def attach(self, idx: int, staged: Staged) -> None:
        """Give a staged expert's forms to the model's layers (engine thread) and count it resident."""
        t0 = time.perf_counter()
        for target, d in staged.items:
            if isinstance(target, ExpertLinear):
                target.set_delta(idx, d)
            elif target is self.model.embed:
                target.deltas[idx] = d
                if self.model.tied:  # the output head is the same matrix
                    self.model.lm_head.set_delta(idx, DenseForm(d))
            else:
                target.deltas[idx] = d
        st = self.stats[self.names[idx]]
        st.loads += 1
        st.load_ms.append(staged.ms + (time.perf_counter() - t0) * 1e3)
        st.resident_bytes = staged.nbytes
        self._resident[idx] = staged.nbytes

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

    def _make_room(self, need: int, keep: int | None = None, protect: Collection[int] = ()) -> bool:
        if self.max_resident_bytes is None:
            return True
        while self.resident_bytes() + need > self.max_resident_bytes:
            victim = next((i for i in self._resident if not self._refs.get(i) and i not in self._pinned
                           and i != keep and i not in protect), None)
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

    def _stage(self, idx: int, layers: Mapping[str, Mapping[str, torch.Tensor]],
               metas: Mapping[str, Mapping[str, Any]]) -> tuple[list[tuple[Any, Any]], int]:
        """Decode and check every stored layer against the model: ``([(target module, form)], bytes held)``."""
        name, device = self.names[idx], self.model.device
        staged: list[tuple[Any, Any]] = []
        held = 0
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
                form = self.backend.prepare(record)
                staged.append((mod, form))
                held += form.nbytes()
                continue
            d = record.delta.to(device)
            owner = layer.removesuffix(".weight")
            if owner in self._linears and d.dim() == 2:  # a linear layer's delta kept dense (lossless)
                if tuple(d.shape) != self._linears[owner].shape:
                    raise UnsupportedModelError(f"expert {name!r}: delta {layer!r} is {list(d.shape)}, the base "
                                                f"weight {list(self._linears[owner].shape)}")
                form = DenseForm(d)
                staged.append((self._linears[owner], form))
                held += form.nbytes()
                continue
            target = self._dense_target(name, layer)
            if tuple(d.shape) != tuple(_param_shape(target, layer)):
                raise UnsupportedModelError(
                    f"expert {name!r}: delta {layer!r} is {list(d.shape)}, the base has {list(_param_shape(target, layer))}"
                )
            if target is not self.model.embed:
                d = d.float()
            staged.append((target, d))
            held += d.numel() * d.element_size()
        return staged, held

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


@dataclass(frozen=True, eq=False)
class Staged:
    """An expert read and prepared, not yet attached: ``items``, (target module, form or dense delta)
    pairs; ``nbytes`` they will hold; ``ms`` reading and preparing took."""

    items: list[tuple[Any, Any]]
    nbytes: int
    ms: float


def _param_shape(target: Any, layer: str) -> tuple[int, ...]:
    if hasattr(target, "weight") and isinstance(target.weight, torch.Tensor):
        return tuple(target.weight.shape)
    return tuple(target.shape)  # ExpertLinear, ExpertEmbedding: whatever form their base weight has
