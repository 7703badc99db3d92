"""Attention of a flat step of many sequences over the slot KV cache, and rotary embeddings.

Shapes as in :mod:`meswitch.engine.model`: ``T`` tokens of the step, ``H``/``H_kv`` query/key-value
heads, ``g = H / H_kv``, ``hd`` head dim, ``r`` rotary dims (``<= hd``). A sequence's query at
position ``p`` sees the key at position ``j`` iff ``j <= p`` and, with a sliding ``window``,
``p - j < window`` (transformers' ``sliding_window_overlay``). In plain PyTorch, per sequence and
query/key head pair::

    s = q @ k.T * scale                       # [n, C]
    s = tanh(s / softcap) * softcap           # only with softcap (Gemma 2)
    out = softmax(s.masked_fill(~visible, -inf), -1) @ v
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from meswitch.engine.kv_cache import KVCache

if TYPE_CHECKING:
    from meswitch.engine.model import SeqSlice, StepBatch


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: ``scale`` of the scores, ``softcap`` (None: none), ``window`` (None: every past key)."""

    scale: float
    softcap: float | None = None
    window: int | None = None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, half-split convention, on the first ``r`` dims: ``x: [T, heads, hd]``,
    ``cos/sin: [T, r]`` -> ``[T, heads, hd]`` (the last ``hd - r`` dims pass through: partial rotary)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), -1)
    half = r // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """A step's rotary tables for :func:`apply_rope_tables`: ``cos, sin: [T, r]`` -> ``(cos, signed_sin)``, each
    ``[T, 1, r]``, ``signed_sin`` with its first half negated (the sign of the rotated half, folded in once)."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[:, :half], sin[:, half:]), -1)[:, None]


def apply_rope_tables(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """:func:`apply_rope` with the tables of :func:`rope_tables` (``cos, signed_sin: [T, 1, r]``): the same
    products, ``x * cos + roll(x, r / 2) * signed_sin``, in fewer ops; ``x: [T, heads, hd]``."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope_tables(x[..., :r], cos, signed_sin), x[..., r:]), -1)
    return x * cos + x.roll(r // 2, -1) * signed_sin


def rope_(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """:func:`apply_rope_tables` in place, on the rotary dims seen as two halves: ``x: [T, heads, 2, r / 2]`` (a
    view, e.g. of the q and k heads of a fused q/k/v output, rotated together; :func:`head_view`) takes
    ``x * cos + roll(x, r / 2) * signed_sin`` with ``cos, signed_sin: [T, 1, 2, r / 2]`` (:func:`rope_tables`'
    tables, last dim unflattened); returns ``x``. The same products, bit for bit; the roll is a flip of the halves."""
    torch.add(x * cos, x.flip(-2) * signed_sin, out=x)  # both products are new tensors: writing over x is safe
    return x


def head_view(y: Tensor, first: int, shape: Sequence[int], strides: Sequence[int]) -> Tensor:
    """``y: [T, ...]`` from element ``first`` of each row on, seen as ``[T, *shape]`` with ``strides`` (in elements)
    within a row: one ``as_strided`` where a slice and a view would make 3 to 5 ATen calls. ``y`` must hold its
    rows' elements contiguously (a linear layer's output, or a view of it split into heads)."""
    return y.as_strided((y.shape[0], *shape), (y.stride(0), *strides), y.storage_offset() + first)


def _visible(qpos: Tensor, length: int, window: int | None) -> Tensor:
    """``[..., length]`` bool: key position ``j`` is visible from query position ``p`` (``qpos: [...]``)."""
    kpos = torch.arange(length, device=qpos.device)
    dist = qpos[..., None] - kpos  # p - j
    ok = dist >= 0
    return ok if window is None else ok & (dist < window)


def _scores(q: Tensor, k: Tensor, spec: AttentionSpec) -> Tensor:
    s = q @ k.transpose(-1, -2) * spec.scale
    if spec.softcap is not None:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    return s


@dataclass(eq=False)
class DecodePlan:
    """Where a step's one-token sequences (decode) sit, built once per step and read by every layer.

    ``rows: int64 [S_d]`` their rows in the step, ``slots``/``positions: int64 [S_d]`` their cache slots
    and positions; decode attention runs over the slot prefix ``[0, n_slots)`` of the cache, ``length``
    positions long. ``gather: int64 [n_slots]``: per slot of the prefix, the decode row (index into
    ``rows``) whose query it takes (row 0 for a slot no decode row uses: its output is dropped).
    ``all_rows``: every row of the step is a decode row, in order (``rows == arange(T)``).
    ``in_slot_order``: decode row ``j`` sits in slot ``j`` for every slot of the prefix (``slots == gather ==
    arange(n_slots)``): the queries need no gather, the outputs no reordering. ``same_length``: every slot of the
    prefix decodes at position ``length - 1`` (every key is visible to every query, windows aside).
    """

    rows: Tensor
    slots: Tensor
    positions: Tensor
    gather: Tensor
    n_slots: int
    length: int
    all_rows: bool
    in_slot_order: bool = False
    same_length: bool = False
    slot_ids: tuple[int, ...] = ()  # slots and positions as Python ints, for the cache's row index
    position_ids: tuple[int, ...] = ()
    _bias: dict[tuple[int | None, torch.dtype], Tensor | None] = field(default_factory=dict)
    _rows: dict[tuple[int, ...], Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, seqs: Sequence[SeqSlice], device: torch.device | str = "cpu") -> DecodePlan | None:
        """The plan of ``seqs`` (a step's sequences in row order), or None when none decodes."""
        rows, slots, pos = [], [], []
        row = 0
        for s in seqs:
            if s.n == 1:
                rows.append(row)
                slots.append(s.slot)
                pos.append(s.start)
            row += s.n
        if not rows:
            return None
        n_slots = max(slots) + 1
        gather = [0] * n_slots
        for j, slot in enumerate(slots):
            gather[slot] = j
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        in_order = slots == list(range(n_slots))
        length = max(pos) + 1
        return cls(as_tensor(rows), as_tensor(slots), as_tensor(pos), as_tensor(gather), n_slots, length,
                   len(rows) == row, in_order, in_order and all(p == length - 1 for p in pos), tuple(slots), tuple(pos))

    def cache_rows(self, cache: KVCache) -> Tensor:
        """``int64 [S_d, 2, H_kv]``: where the decode rows' keys and values go in ``cache.rows[l]``
        (:meth:`KVCache.token_rows`), made once per step and cache geometry for every layer."""
        key = tuple(cache.kv[0].shape)
        if key not in self._rows:
            self._rows[key] = cache.token_rows(self.slot_ids, self.position_ids)
        return self._rows[key]

    def bias(self, window: int | None, dtype: torch.dtype) -> Tensor | None:
        """``[n_slots, 1, 1, length]`` additive mask: 0 where a slot's query sees the key, ``-inf`` where not
        (:func:`_visible`); 0 everywhere for slots no decode row uses (no all-masked rows, no NaN). None when
        it would be 0 everywhere (:attr:`same_length`, within the window): adding 0 to a score changes nothing."""
        key = (window, dtype)
        if key not in self._bias and self.same_length and (window is None or self.length <= window):
            self._bias[key] = None
        if key not in self._bias:
            visible = torch.ones(self.n_slots, self.length, dtype=torch.bool, device=self.slots.device)
            visible[self.slots] = _visible(self.positions, self.length, window)
            bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
            self._bias[key] = bias[:, None, None, :]
        return self._bias[key]


def attention(q: Tensor, k: Tensor, v: Tensor, batch: StepBatch, cache: KVCache, layer: int,
              spec: AttentionSpec) -> Tensor:
    """Causal (optionally windowed, soft-capped) attention of every sequence over its cached past plus this step.

    ``q: [T, H, hd]``, ``k, v: [T, H_kv, hd]`` (new tokens, written into the cache first) -> ``[T, H * hd]``:
    :func:`attention_heads` over the three side by side.
    """
    return attention_heads(torch.cat((q, k, v), 1), q.shape[1], batch, cache, layer, spec)


def attention_heads(qkv: Tensor, heads: int, batch: StepBatch, cache: KVCache, layer: int,
                    spec: AttentionSpec) -> Tensor:
    """:func:`attention` of the step's q, k and v heads side by side, as a fused q/k/v projection gives them:
    ``qkv: [T, H + 2 H_kv, hd]`` (q heads, then k, then v; a view may do) -> ``[T, H * hd]``.

    Sequences of one token (decode) attend together over a view of the cache's slot prefix
    (:class:`DecodePlan`, built once per step), their keys and values written with one indexed copy;
    longer ones (prefill) one by one with a causal mask.
    """
    t, _, hd = qkv.shape
    plan = batch.decode
    if plan is not None and plan.all_rows:
        return _decode(qkv, heads, plan, cache, layer, spec, flat=True)
    kvh = (qkv.shape[1] - heads) // 2
    q, k, v = qkv.split((heads, kvh, kvh), 1)
    out = qkv.new_empty(t, heads, hd)
    row = 0
    for s in batch.seqs:
        if s.n > 1:
            out[row : row + s.n] = _prefill(q[row : row + s.n], k[row : row + s.n], v[row : row + s.n], s, cache,
                                            layer, spec)
        row += s.n
    if plan is not None:
        out.index_copy_(0, plan.rows, _decode(qkv.index_select(0, plan.rows), heads, plan, cache, layer, spec))
    return out.reshape(t, heads * hd)


def _prefill(q: Tensor, k: Tensor, v: Tensor, s: SeqSlice, cache: KVCache, layer: int, spec: AttentionSpec) -> Tensor:
    """One sequence's ``n`` new tokens (``q: [n, H, hd]``, ``k, v: [n, H_kv, hd]``) -> ``[n, H, hd]``."""
    n, heads, hd = q.shape
    kvh = k.shape[1]
    cache.write(layer, s.slot, s.start, k, v)
    end = s.start + n
    kc, vc = cache.k[layer][s.slot, :, :end], cache.v[layer][s.slot, :, :end]  # [H_kv, end, hd]
    qs = q.view(n, kvh, heads // kvh, hd).permute(1, 2, 0, 3)  # [H_kv, g, n, hd]
    scores = _scores(qs, kc[:, None], spec)  # [H_kv, g, n, end]
    visible = _visible(torch.arange(s.start, end, device=q.device), end, spec.window)  # [n, end]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), -1).to(vc.dtype)
    return (probs @ vc[:, None]).permute(2, 0, 1, 3).reshape(n, heads, hd)


def _decode(qkv: Tensor, heads: int, plan: DecodePlan, cache: KVCache, layer: int, spec: AttentionSpec,
            flat: bool = False) -> Tensor:
    """The decode rows (``qkv: [S_d, H + 2 H_kv, hd]``, in ``plan.rows`` order, as in :func:`attention_heads`)
    -> ``[S_d, H, hd]`` (``flat``: ``[S_d, H * hd]``).

    Each slot of the prefix attends with its own query, as a ``g``-query attention over its kv head
    (``[n_slots, H_kv, g, hd]`` against ``[n_slots, H_kv, C', hd]``); without a soft-cap in one fused
    ``scaled_dot_product_attention``, the plain PyTorch of the module docstring otherwise.
    """
    s_d, width, hd = qkv.shape
    if qkv.stride()[1:] != (hd, 1):  # head_view reads rows of whole heads
        qkv = qkv.contiguous()
    kvh = (width - heads) // 2
    g = heads // kvh
    cache.write_rows(layer, plan.cache_rows(cache),
                     head_view(qkv, heads * hd, (2, kvh, hd), (kvh * hd, hd, 1)))  # qkv[:, H:] as [S_d, 2, H_kv, hd]
    k, v = cache.k[layer], cache.v[layer]  # [N, H_kv, C, hd], contiguous: the prefix is a view of the same strides
    kc = k.as_strided((plan.n_slots, kvh, plan.length, hd), k.stride())  # k[:n_slots, :, :length]
    vc = v.as_strided((plan.n_slots, kvh, plan.length, hd), v.stride())
    qd = head_view(qkv, 0, (kvh, g, hd), (g * hd, hd, 1))  # [S_d, H_kv, g, hd]
    if not plan.in_slot_order:
        qd = qd.index_select(0, plan.gather)  # [N', H_kv, g, hd]
    bias = plan.bias(spec.window, qkv.dtype)
    if spec.softcap is None:
        o = F.scaled_dot_product_attention(qd, kc, vc, attn_mask=bias, scale=spec.scale)
    else:
        scores = _scores(qd, kc, spec)
        probs = torch.softmax((scores if bias is None else scores + bias).float(), -1).to(vc.dtype)  # [N', H_kv, g, C']
        o = probs @ vc
    if not plan.in_slot_order:
        o = o.index_select(0, plan.slots)
    shape = (s_d, heads * hd) if flat else (s_d, heads, hd)
    return o.view(shape) if o.is_contiguous() else o.reshape(shape)
