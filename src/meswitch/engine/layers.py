"""Layers of the serving model that hold per-expert deltas beside the shared base weights.

Shapes: ``T`` rows of a step (one row = one token of one sequence, sequences of different experts
mixed), ``in``/``out`` a linear layer's features, ``D`` hidden size, ``V`` vocabulary. Every layer
takes the step's :class:`~meswitch.engine.segments.Segments` (row -> expert index, ``-1`` = base).

:class:`ExpertLinear` computes, for row ``i`` of expert ``e``::

    y[i] = x[i] @ (W_base + delta_e)^T + b        # delta_{-1} = 0

as ``base(x)`` plus every expert's delta on its rows, added by the engine's delta backend
(:mod:`meswitch.engine.backends`) in one ``add`` per layer; or, when every row belongs to one
expert that has merged weights, one matmul with ``W_base + delta_e``.

:class:`SharedInputLinears` runs layers that read one input (q/k/v, gate/up) as one: a stacked
base weight (the layers' parameters become views of it) and one backend ``add`` for every layer's
and expert's delta, each layer on its own output columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meswitch.engine.backends import DeltaBackend, Work
from meswitch.engine.backends.forms import Form
from meswitch.engine.base_blocks import BlockEmbedding, BlockLinear, dense_weight
from meswitch.engine.segments import Segments


class ExpertLinear(nn.Module):
    """A base ``nn.Linear`` (or :class:`~meswitch.engine.base_blocks.BlockLinear`, the same served from
    GGUF blocks) plus per-expert delta forms and optional merged weights (module docstring).

    ``deltas``: expert index -> the backend's resident form; ``merged``: expert index -> ``W_base + delta``;
    ``state``: what the backend derives from this layer's forms (cleared when they change).
    """

    def __init__(self, base: nn.Module, backend: DeltaBackend) -> None:
        super().__init__()
        self.base = base
        self.backend = backend
        self.deltas: dict[int, Form] = {}
        self.merged: dict[int, Tensor] = {}
        self.state: dict[Any, Any] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return (self.base.out_features, self.base.in_features)

    def set_delta(self, idx: int, form: Form) -> None:
        """Hold ``form`` as expert ``idx``'s delta (ValueError unless it is ``[out, in]`` of this layer)."""
        if tuple(form.shape) != self.shape:
            raise ValueError(f"expert {idx}: delta is {list(form.shape)}, the base weight {list(self.shape)}")
        self.deltas[idx] = form
        self.merged.pop(idx, None)
        self.state.clear()

    def merge(self, idx: int) -> int:
        """Cache ``W_base + delta_idx`` for expert ``idx``; returns the bytes it takes."""
        w = dense_weight(self.base)
        self.merged[idx] = (w.float() + self.deltas[idx].dequantize()).to(w.dtype)
        return self.merged[idx].numel() * self.merged[idx].element_size()

    def drop(self, idx: int) -> None:
        """Forget expert ``idx`` (its delta and any merged weight)."""
        self.deltas.pop(idx, None)
        self.merged.pop(idx, None)
        self.state.clear()


    def work(self, segments: Segments, column: int = 0) -> list[Work]:
        """``(form, s, t, column)`` for every segment whose expert has a delta here (sorted-row coordinates)."""
        return [(self.deltas[e], s, t, column) for e, s, t in segments if s < t and e in self.deltas]

    def forward(self, x: Tensor, segments: Segments) -> Tensor:
        """``x: [T, in]`` -> ``[T, out]``; rows of experts with no delta in this layer get the base."""
        single = segments.single_expert
        if single is not None:  # one weight for every row: a merged one, or the base's
            if single in self.merged:
                return F.linear(x, self.merged[single], self.base.bias)
            if single < 0 or single not in self.deltas:
                return self.base(x)
        # Mixed batch: one pass over the base weight for every row, then each expert's delta on its
        # rows. Merged weights are not used here: they would read one full weight copy per expert.
        y = self.base(x)
        self.add_deltas(x, segments, y)
        return y

    def add_deltas(self, x: Tensor, segments: Segments, y: Tensor) -> None:
        """``y[i] += x[i] @ delta_{e_i}^T`` for every row whose expert has a delta here (``y: [T, out]``)."""
        add_work(self.backend, x, segments, y, self.work(segments), self.state)


def add_work(backend: DeltaBackend, x: Tensor, segments: Segments, y: Tensor, work: Sequence[Work],
             state: dict[Any, Any]) -> None:
    """``backend.add`` on a step in batch order: directly when its rows are sorted by expert (the
    engine's steps), else on the gathered rows, scattered back (``x: [T, in]``, ``y: [T, N]``)."""
    if not work:
        return
    if segments.is_sorted:
        backend.add(x, y, work, state)
        return
    ys = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    backend.add(segments.gather(x), ys, work, state)
    y.index_add_(0, segments.order.to(y.device), ys.to(y.dtype))


class SharedInputLinears(nn.Module):
    """Linear layers that read the same input (q/k/v; gate/up) run as one: ``forward(x, segments)``
    equals ``[m(x, segments) for m in layers]``, with fewer and wider calls.

    The layers' base weights (and biases) are stacked into one ``[sum out, in]`` tensor and the
    layers' own parameters become views of it, so the base is held once and a step makes one base
    matmul and one backend ``add`` for the group (each layer's deltas on its columns of the stacked
    output). Batches of one merged expert and weights that were moved or replaced since take the
    layers one by one.
    """

    def __init__(self, layers: Sequence[ExpertLinear]) -> None:
        super().__init__()
        self._layers = tuple(layers)  # not registered: they stay the decoder layer's submodules
        self.widths = [m.shape[0] for m in layers]
        self._columns = [sum(self.widths[:j]) for j in range(len(layers))]  # each layer's first output column
        self.state: dict[Any, Any] = {}
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.blocks: BlockLinear | None = None  # the stacked base when the layers are served from GGUF blocks
        self._bases = tuple(m.base for m in layers)
        bases = self._bases
        if all(isinstance(b, BlockLinear) for b in bases):
            self.blocks = BlockLinear.stack(bases)  # type: ignore[arg-type]
            self._ptrs = [b.blocks.data_ptr() for b in bases]  # type: ignore[union-attr]
            return
        if not all(isinstance(b, nn.Linear) for b in bases):
            return
        w0 = bases[0].weight
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
        """Whether the layers' bases are still the ones stacked at construction, their weights (or blocks) still
        the views of the stacked tensor."""
        if self.weight is None and self.blocks is None:
            return False
        if not all(m.base is b for m, b in zip(self._layers, self._bases, strict=True)):
            return False
        ptrs = [m.base.blocks.data_ptr() if self.blocks is not None else m.base.weight.data_ptr() for m in self._layers]
        return ptrs == self._ptrs

    def forward(self, x: Tensor, segments: Segments) -> list[Tensor]:
        """``x: [T, in]`` -> one ``[T, out_j]`` per layer (column views of one ``[T, sum out]`` output)."""
        if not self._as_one(segments):
            return [m(x, segments) for m in self._layers]
        return list(self._stacked_forward(x, segments).split(self.widths, 1))

    def joint(self, x: Tensor, segments: Segments) -> Tensor:
        """``x: [T, in]`` -> ``[T, sum out]``: every layer's output side by side (what :meth:`forward` splits)."""
        if not self._as_one(segments):
            return torch.cat([m(x, segments) for m in self._layers], 1)
        return self._stacked_forward(x, segments)

    def _as_one(self, segments: Segments) -> bool:
        """Whether the step runs on the stacked base (no merged expert takes the batch, the stack still holds)."""
        single = segments.single_expert
        return self._stacked() and not (single is not None and any(single in m.merged for m in self._layers))

    def _stacked_forward(self, x: Tensor, segments: Segments) -> Tensor:
        layers = self._layers
        y = self.blocks(x) if self.blocks is not None else F.linear(x, self.weight, self.bias)  # type: ignore[arg-type]
        work = [w for m, col in zip(layers, self._columns, strict=True) for w in m.work(segments, col)]
        add_work(layers[0].backend, x, segments, y, work, self.state)
        return y


def _same_objects(a: Sequence[object], b: Sequence[object]) -> bool:
    """Whether ``a`` and ``b`` hold the very same objects in order (a cache built from ``a`` still holds for ``b``).

    By identity, not by ``id()``: the cache keeps ``a`` alive, so no object of ``b`` can reuse an address.
    """
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def rms_normalize(x: Tensor, width: Tensor, eps: Tensor) -> Tensor:
    """``x / sqrt(mean(x^2, -1) + eps)`` for float32 ``x: [..., D]``: ``torch.rms_norm(x, (D,), None, eps)`` bit for bit,
    in 6 ATen calls instead of its 23 (on a CPU, ``rms_norm`` is a composite of ``pow``, ``mean``, ``add_``, ...,
    with scalar wrapping and dtype checks around each).

    ``width``, ``eps``: float32 0-dim tensors holding ``D`` and ``eps`` (made once: a Python number here would
    be wrapped into a tensor on every call). The same products as the composite: ``pow(x, 2)`` is ``x * x``,
    ``mean`` is ``sum`` then a division by ``D``, then ``eps`` is added in float32 (here both in one ``addcdiv``).
    """
    # addcdiv: eps + sum / D, the division rounded first as in mean(...) + eps (a multiplication by 1 is exact)
    return x * torch.addcdiv(eps, (x * x).sum(-1, keepdim=True), width).rsqrt_()


class ExpertNorm(nn.Module):
    """RMSNorm with per-expert weight deltas: ``y[i] = rms_normalize(x[i]) * (w + dw_{e_i})``.

    ``x: [T, ..., D]`` -> the same shape (``[T, D]`` for a layer norm, ``[T, heads, hd]`` for the
    per-head q/k norms of Qwen3 and Gemma 3); ``dw`` float ``[D]``, from a dense stored delta of the
    norm weight. ``unit_offset`` (Gemma, whose norm weights are stored minus one): ``y[i] =
    rms_normalize(x[i]) * (1 + w + dw_{e_i})``, multiplied in float32 before the cast back, as
    transformers' ``Gemma2RMSNorm`` does; otherwise the normalized ``x`` is cast first, as in
    ``LlamaRMSNorm``. A step with deltas gathers each row's weight from a table (one row per expert
    id, rebuilt when the deltas change): three ops per norm however many experts the step holds.
    """

    def __init__(self, weight: Tensor, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.unit_offset = unit_offset
        self.deltas: dict[int, Tensor] = {}
        # rms_normalize's constants, made once (float32 0-dim tensors act as scalars on any device)
        self._width, self._eps = torch.tensor(float(weight.shape[-1])), torch.tensor(eps)
        self._table: tuple[tuple[tuple[int, ...], tuple[Tensor, ...]], Tensor] | None = None

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    def table(self, min_rows: int = 0) -> Tensor:
        """``[R, D]``, ``R >= min_rows``: row ``e + 1`` is ``w + dw_e`` (``w`` where expert ``e`` has no
        delta), row 0 is ``w`` (the base); in the weight's dtype, or float32 ``1 + w + dw_e`` with ``unit_offset``."""
        key = (tuple(self.deltas), tuple(self.deltas.values()))  # the table holds the tensors it was built from
        held = self._table
        if held is None or held[0][0] != key[0] or not _same_objects(held[0][1], key[1]) or held[1].shape[0] < min_rows:
            w = self.weight.detach()
            table = w.float().expand(max(max(self.deltas, default=-1) + 2, min_rows), -1).clone()
            for e, d in self.deltas.items():
                table[e + 1] += d.to(table.device, torch.float32)
            self._table = (key, table + 1.0 if self.unit_offset else table.to(w.dtype))
        return self._table[1]

    def forward(self, x: Tensor, segments: Segments, expert_rows: Tensor, table_rows: Tensor | None = None) -> Tensor:
        """``expert_rows: int64 [T]``, the expert index of each row (``segments.expert_ids`` as a tensor);
        ``table_rows``: ``expert_rows + 1`` where the caller has it (:attr:`~meswitch.engine.model.StepBatch.table_rows`,
        made once per step rather than once per norm)."""
        held = self.deltas and any(e in self.deltas for e in segments.experts)
        f32 = x.dtype == torch.float32
        normed = rms_normalize(x if f32 else x.float(), self._width, self._eps)
        if not held and not self.unit_offset and f32 and self.weight.dtype == torch.float32:
            return normed * self.weight  # torch.rms_norm(x, (D,), weight, eps) bit for bit
        if held:
            # [T, D]; indexing makes fewer ATen calls than index_select (4, not 6), the same copy
            w = self.table(segments.experts[-1] + 2)[expert_rows + 1 if table_rows is None else table_rows]
            if x.dim() > 2:
                w = w.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        else:
            w = 1.0 + self.weight.float() if self.unit_offset else self.weight
        if self.unit_offset:
            normed = normed * w
            return normed if f32 else normed.to(x.dtype)
        return w * (normed if f32 else normed.to(x.dtype))


class ExpertEmbedding(nn.Module):
    """Token embedding with per-expert dense deltas: ``h[i] = (E[ids[i]] + dE_{e_i}[ids[i]]) * scale``; ``base`` an
    ``nn.Embedding`` or a :class:`~meswitch.engine.base_blocks.BlockEmbedding`.

    ``ids: int64 [T]`` -> ``[T, D]``; ``dE``: ``[V, D]`` (16 bit as stored). ``scale`` (Gemma:
    ``sqrt(D)``), cast to the embedding's dtype as transformers does; None: no scaling.
    """

    def __init__(self, base: nn.Embedding, scale: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.deltas: dict[int, Tensor] = {}

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    @property
    def shape(self) -> tuple[int, int]:
        """``(V, D)``."""
        b = self.base
        return b.shape if isinstance(b, BlockEmbedding) else tuple(b.weight.shape)  # type: ignore[return-value]

    def forward(self, ids: Tensor, segments: Segments, expert_rows: Tensor) -> Tensor:
        b = self.base
        # not b(ids) for a Hugging Face module: a scaled embedding module would scale before the deltas
        h = b(ids) if isinstance(b, BlockEmbedding) else F.embedding(ids, b.weight)
        for e in segments.experts:
            if e in self.deltas:
                rows = expert_rows == e
                h[rows] += self.deltas[e][ids[rows]].to(h.dtype)
        if self.scale is None:
            return h
        return h * torch.tensor(self.scale).to(h.dtype)
