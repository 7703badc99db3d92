"""The serving model: a Llama-family decoder run over a flat batch of tokens from many sequences.

Shape legend: ``T`` tokens in a step (all sequences concatenated), ``S`` sequences in the step,
``D`` hidden size, ``H``/``H_kv`` query/key-value heads, ``hd`` head dim, ``g = H / H_kv``,
``V`` vocabulary, ``C`` cached positions. Each sequence contributes ``n_j`` consecutive tokens at
positions ``[start_j, start_j + n_j)``: a prefill (``n_j`` = prompt length) or a decode step
(``n_j = 1``); both kinds mix in one forward, and every linear layer sees all ``T`` rows at once,
grouped by expert. Attention reads the slot-based :class:`~meswitch.engine.kv_cache.KVCache`.

Per layer, in plain PyTorch (what Hugging Face's ``LlamaDecoderLayer`` computes)::

    h = h + o_proj(attn(rope(q_proj(norm1(h))), rope(k_proj(norm1(h))), v_proj(norm1(h))))
    h = h + down_proj(act(gate_proj(norm2(h))) * up_proj(norm2(h)))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from meswitch.engine.backends import DeltaBackend
from meswitch.engine.errors import UnsupportedModelError
from meswitch.engine.kv_cache import KVCache
from meswitch.engine.layers import ExpertEmbedding, ExpertLinear, ExpertNorm, SharedInputLinears
from meswitch.engine.segments import Segments

SUPPORTED = ("llama", "mistral", "qwen2")
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of a step: cache ``slot``, first position ``start``, ``n`` new tokens, ``expert``."""

    slot: int
    start: int
    n: int
    expert: int


@dataclass(frozen=True, eq=False)
class StepBatch:
    """A step's layout: ``seqs`` in token order, ``segments``/``expert_rows`` over the ``T`` rows."""

    seqs: tuple[SeqSlice, ...]
    segments: Segments
    expert_rows: Tensor  # int64 [T]
    positions: Tensor  # int64 [T]
    last_rows: Tensor  # int64 [S], the row of each sequence's last token

    @classmethod
    def build(cls, seqs: list[SeqSlice], device: torch.device | str = "cpu") -> StepBatch:
        ids = [s.expert for s in seqs for _ in range(s.n)]
        pos = [p for s in seqs for p in range(s.start, s.start + s.n)]
        last = torch.tensor([s.n for s in seqs]).cumsum(0) - 1
        return cls(tuple(seqs), Segments.from_ids(ids).to(device), torch.tensor(ids, device=device),
                   torch.tensor(pos, device=device), last.to(device))

    def last_segments(self) -> Segments:
        """Segments over the ``S`` last-token rows (for the output head)."""
        return Segments.from_ids([s.expert for s in self.seqs])


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, cfg: object, backend: DeltaBackend) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        eps = cfg.rms_norm_eps
        self.norm1 = ExpertNorm(hf_layer.input_layernorm.weight, eps)
        self.norm2 = ExpertNorm(hf_layer.post_attention_layernorm.weight, eps)
        self.q, self.k, self.v, self.o = (ExpertLinear(m, backend) for m in (attn.q_proj, attn.k_proj, attn.v_proj,
                                                                       attn.o_proj))
        self.gate, self.up, self.down = (ExpertLinear(m, backend) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        self.qkv, self.gate_up = SharedInputLinears((self.q, self.k, self.v)), SharedInputLinears((self.gate, self.up))
        self.act = mlp.act_fn
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def linears(self) -> dict[str, ExpertLinear]:
        mods = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        return dict(zip(_LINEARS, mods, strict=True))

    def forward(self, h: Tensor, batch: StepBatch, cos: Tensor, sin: Tensor, cache: KVCache, index: int) -> Tensor:
        seg, rows = batch.segments, batch.expert_rows
        x = self.norm1(h, seg, rows)
        t = x.shape[0]
        q, k, v = self.qkv(x, seg)
        q = _rope(q.view(t, self.heads, self.head_dim), cos, sin)
        k = _rope(k.view(t, self.kv_heads, self.head_dim), cos, sin)
        a = attention(q, k, v.view(t, self.kv_heads, self.head_dim), batch, cache, index)  # [T, H * hd]
        h = h + self.o(a, seg)
        x = self.norm2(h, seg, rows)
        gate, up = self.gate_up(x, seg)
        return h + self.down(self.act(gate) * up, seg)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding, half-split convention: ``x: [T, heads, hd]``, ``cos/sin: [T, hd]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos[:, None] + rotated * sin[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor, batch: StepBatch, cache: KVCache, layer: int) -> Tensor:
    """Causal attention of every sequence over its cached past plus this step's tokens.

    ``q: [T, H, hd]``, ``k, v: [T, H_kv, hd]`` (new tokens, written into the cache first) -> ``[T, H * hd]``.
    Sequences of one token (decode) attend together over a view of the cache's slot prefix;
    longer ones (prefill) one by one with a causal mask.
    """
    t, heads, hd = q.shape
    kvh = k.shape[1]
    g, scale = heads // kvh, 1.0 / math.sqrt(hd)
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
            scores = qs @ kc[:, None].transpose(-1, -2) * scale  # [H_kv, g, n, end]
            qpos = torch.arange(s.start, end, device=q.device)[:, None]
            mask = torch.arange(end, device=q.device)[None, :] > qpos  # [n, end]
            probs = torch.softmax(scores.masked_fill(mask, float("-inf")).float(), -1).to(vc.dtype)
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
        scores = qd @ kc.transpose(-1, -2) * scale  # [N', H_kv, g, C']
        valid = torch.zeros(n_slots, length, dtype=torch.bool, device=q.device)
        valid[slots] = torch.arange(length, device=q.device)[None, :] <= pos[:, None]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores.float(), -1).nan_to_num_(0.0).to(vc.dtype)
        out[rows] = (probs @ vc)[slots].reshape(-1, heads, hd)
    return out.reshape(t, heads * hd)


class ServingModel(nn.Module):
    """A Hugging Face Llama-family causal LM rewired for multi-expert, continuously batched decoding.

    The Hugging Face modules' weights are shared, not copied: each layer's q/k/v and gate/up
    parameters become views of one stacked tensor (:class:`SharedInputLinears`), same values, so
    the Hugging Face model still runs as before. ``forward(ids: int64 [T], batch,
    cache) -> logits: float32 [S, V]`` for the last token of each sequence in ``batch``. ``backend``
    (:mod:`meswitch.engine.backends`) holds and applies every linear layer's expert deltas.
    """

    def __init__(self, hf_model: nn.Module, backend: DeltaBackend) -> None:
        super().__init__()
        cfg = hf_model.config
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            raise UnsupportedModelError(
                f"the engine runs {', '.join(SUPPORTED)} models; this base is {getattr(cfg, 'model_type', None)!r}"
            )
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            raise UnsupportedModelError("sliding-window attention is not supported by the engine")
        self.config = cfg
        inner = hf_model.model
        self.embed = ExpertEmbedding(inner.embed_tokens)
        self.backend = backend
        self.layers = nn.ModuleList(DecoderLayer(layer, cfg, backend) for layer in inner.layers)
        self.norm = ExpertNorm(inner.norm.weight, cfg.rms_norm_eps)
        self.lm_head = ExpertLinear(hf_model.lm_head, backend)
        self.rotary = inner.rotary_emb
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        first = self.layers[0]
        self.kv_heads, self.head_dim = first.kv_heads, first.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.base.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.base.weight.device

    def linears(self) -> Iterator[tuple[str, ExpertLinear]]:
        """Every delta-capable linear layer under its Hugging Face module name."""
        for i, layer in enumerate(self.layers):
            for name, mod in layer.linears().items():
                yield f"model.layers.{i}.{name}", mod
        yield "lm_head", self.lm_head

    def norms(self) -> Iterator[tuple[str, ExpertNorm]]:
        """Every RMSNorm under its Hugging Face parameter name."""
        for i, layer in enumerate(self.layers):
            yield f"model.layers.{i}.input_layernorm.weight", layer.norm1
            yield f"model.layers.{i}.post_attention_layernorm.weight", layer.norm2
        yield "model.norm.weight", self.norm

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(len(self.layers), slots, self.kv_heads, self.head_dim, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, ids: Tensor, batch: StepBatch, cache: KVCache) -> Tensor:
        seg, rows = batch.segments, batch.expert_rows
        h = self.embed(ids, seg, rows)  # [T, D]
        cos, sin = self.rotary(h[None], batch.positions[None])
        cos, sin = cos[0].to(h.dtype), sin[0].to(h.dtype)  # [T, hd]
        for i, layer in enumerate(self.layers):
            h = layer(h, batch, cos, sin, cache, i)
        for s in batch.seqs:
            cache.lengths[s.slot] = s.start + s.n
        last = h.index_select(0, batch.last_rows)  # [S, D]
        last_seg = batch.last_segments()
        last_rows = torch.tensor(last_seg.expert_ids, device=h.device)
        return self.lm_head(self.norm(last, last_seg, last_rows), last_seg).float()
