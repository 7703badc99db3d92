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

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
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


def attention(q: Tensor, k: Tensor, v: Tensor, batch: StepBatch, cache: KVCache, layer: int,
              spec: AttentionSpec) -> Tensor:
    """Causal (optionally windowed, soft-capped) attention of every sequence over its cached past plus this step.

    ``q: [T, H, hd]``, ``k, v: [T, H_kv, hd]`` (new tokens, written into the cache first) -> ``[T, H * hd]``.
    Sequences of one token (decode) attend together over a view of the cache's slot prefix;
    longer ones (prefill) one by one with a causal mask.
    """
    t, heads, hd = q.shape
    kvh = k.shape[1]
    g = heads // kvh
    out = q.new_empty(t, heads, hd)
    decode: list[tuple[int, SeqSlice]] = []
    row = 0
    for s in batch.seqs:
        if s.n == 1:
            decode.append((row, s))
        else:
            cache.write(layer, s.slot, s.start, k[row : row + s.n], v[row : row + s.n])
            end = s.start + s.n
            kc, vc = cache.k[layer][s.slot, :, :end], cache.v[layer][s.slot, :, :end]  # [H_kv, end, hd]
            qs = q[row : row + s.n].view(s.n, kvh, g, hd).permute(1, 2, 0, 3)  # [H_kv, g, n, hd]
            scores = _scores(qs, kc[:, None], spec)  # [H_kv, g, n, end]
            visible = _visible(torch.arange(s.start, end, device=q.device), end, spec.window)  # [n, end]
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")).float(), -1).to(vc.dtype)
            out[row : row + s.n] = (probs @ vc[:, None]).permute(2, 0, 1, 3).reshape(s.n, heads, hd)
        row += s.n
    if decode:
        rows = torch.tensor([r for r, _ in decode], device=q.device)
        slots = torch.tensor([s.slot for _, s in decode], device=q.device)
        pos = torch.tensor([s.start for _, s in decode], device=q.device)
        cache.write_tokens(layer, slots, pos, k[rows], v[rows])
        n_slots = int(slots.max()) + 1
        length = int(pos.max()) + 1
        kc = cache.k[layer][:n_slots, :, :length]  # [N', H_kv, C', hd] (a view)
        vc = cache.v[layer][:n_slots, :, :length]
        qd = q.new_zeros(n_slots, kvh, g, hd)
        qd[slots] = q[rows].view(-1, kvh, g, hd)
        scores = _scores(qd, kc, spec)  # [N', H_kv, g, C']
        valid = torch.zeros(n_slots, length, dtype=torch.bool, device=q.device)
        valid[slots] = _visible(pos, length, spec.window)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), -1).nan_to_num_(0.0).to(vc.dtype)
        out[rows] = (probs @ vc)[slots].reshape(-1, heads, hd)
    return out.reshape(t, heads * hd)
