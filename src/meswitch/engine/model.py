"""The serving model: one decoder, for every supported family, run over a flat batch of tokens from many sequences.

Shape legend: ``T`` tokens in a step (all sequences concatenated), ``S`` sequences in the step,
``D`` hidden size, ``H``/``H_kv`` query/key-value heads, ``hd`` head dim, ``g = H / H_kv``,
``V`` vocabulary, ``C`` cached positions. Each sequence contributes ``n_j`` consecutive tokens at
positions ``[start_j, start_j + n_j)``: a prefill (``n_j`` = prompt length) or a decode step
(``n_j = 1``); both kinds mix in one forward, and every linear layer sees all ``T`` rows at once,
grouped by expert. Attention reads the slot-based :class:`~meswitch.engine.kv_cache.KVCache`.

Per layer, in plain PyTorch (what Hugging Face's ``LlamaDecoderLayer`` computes; the bracketed
steps are the ones a family's :class:`~meswitch.engine.families.FamilySpec` switches on)::

    q, k, v = q_proj(norm1(h)), k_proj(norm1(h)), v_proj(norm1(h))     # phi3: qkv_proj(norm1(h)), split
    [q, k = q_norm(q), k_norm(k)]                                       # per head: qwen3, gemma3
    a = o_proj(attn(rope(q), rope(k), v))                               # window, scale, soft-cap: attention.py
    h = h + [post_attention_norm](a)                                    # gemma
    m = down_proj(act(gate_proj(norm2(h))) * up_proj(norm2(h)))         # phi3: gate_up_proj, split
    h = h + [post_feedforward_norm](m)                                  # gemma

and around the layers ``h = embed(ids) [* sqrt(D)]``, ``logits = lm_head(norm(h)) [soft-capped]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter

import torch
from torch import Tensor, nn

from meswitch.engine.attention import (
    AttentionSpec,
    DecodePlan,
    attention_heads,
    head_view,
    rope_,
    rope_tables,
)
from meswitch.engine.backends import DeltaBackend
from meswitch.engine.families import SUPPORTED, FamilySpec
from meswitch.engine.kv_cache import KVCache
from meswitch.engine.layers import ExpertEmbedding, ExpertLinear, ExpertNorm, SharedInputLinears
from meswitch.engine.segments import Segments

__all__ = ["SUPPORTED", "DecoderLayer", "ExpertBias", "FamilySpec", "FusedLinear", "SeqSlice", "ServingModel", "StepBatch"]

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
        last = list(itertools.accumulate(s.n for s in seqs))  # one past each sequence's last row
        return cls(tuple(seqs), Segments.from_ids(ids).to(device), torch.tensor(ids, device=device),
                   torch.tensor(pos, device=device), torch.tensor([r - 1 for r in last], dtype=torch.int64, device=device))

    @cached_property
    def decode(self) -> DecodePlan | None:
        """The decode rows' layout over the cache, for every layer's attention (None: no sequence decodes)."""
        return DecodePlan.build(self.seqs, self.positions.device)

    @cached_property
    def table_rows(self) -> Tensor:
        """``expert_rows + 1``, int64 ``[T]``: each row's row in the per-expert tables of norms and biases
        (row 0: the base), made once per step for every layer."""
        return self.expert_rows + 1

    def last_segments(self) -> Segments:
        """Segments over the ``S`` last-token rows (for the output head): :attr:`segments` itself when every
        sequence has one row (a decode step)."""
        if len(self.seqs) == self.segments.num_rows:
            return self.segments
        return Segments.from_ids([s.expert for s in self.seqs])


class FusedLinear(nn.Module):
    """One :class:`ExpertLinear` whose output is several projections side by side (Phi-3's ``qkv_proj``,
    ``gate_up_proj``): ``forward(x, segments)`` -> one ``[T, w_j]`` column view per width in ``widths``.
    The stored delta is the fused matrix's, as its Hugging Face module name says."""

    def __init__(self, linear: ExpertLinear, widths: Sequence[int]) -> None:
        super().__init__()
        if sum(widths) != linear.shape[0]:
            raise ValueError(f"widths {list(widths)} do not add up to the layer's {linear.shape[0]} outputs")
        self.linear = linear
        self.widths = list(widths)

    def forward(self, x: Tensor, segments: Segments) -> list[Tensor]:
        return list(self.linear(x, segments).split(self.widths, -1))

    def joint(self, x: Tensor, segments: Segments) -> Tensor:
        """The projections side by side, ``[T, sum w_j]`` (what :meth:`forward` splits)."""
        return self.linear(x, segments)


class ExpertBias(nn.Module):
    """Per-expert deltas of a linear layer's bias: ``y[i] + db_{e_i}`` (``y: [T, out]`` already holding the base
    bias, ``db`` float ``[out]`` from a dense stored delta; rows of experts without one are left as they are).
    ``weight`` is the base bias itself (the parameter the stored delta is named after)."""

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.weight = bias
        self.deltas: dict[int, Tensor] = {}

    def drop(self, idx: int) -> None:
        self.deltas.pop(idx, None)

    def forward(self, y: Tensor, segments: Segments, expert_rows: Tensor) -> Tensor:
        table = self._table(y, segments)
        return y if table is None else y + table.index_select(0, expert_rows + 1)

    def add_(self, y: Tensor, segments: Segments, table_rows: Tensor) -> None:
        """:meth:`forward` in place on ``y`` (a column view of a fused output may do); ``table_rows``:
        ``expert_rows + 1`` (:attr:`StepBatch.table_rows`)."""
        table = self._table(y, segments)
        if table is not None:
            y.add_(table.index_select(0, table_rows))

    def _table(self, y: Tensor, segments: Segments) -> Tensor | None:
        """``[max expert + 2, out]``: row ``e + 1`` expert ``e``'s delta, row 0 none (None: no expert of the step has one)."""
        held = [e for e in segments.experts if e in self.deltas]
        if not held:
            return None
        table = y.new_zeros(max(segments.experts) + 2, y.shape[-1])
        for e in held:
            table[e + 1] = self.deltas[e].to(y.dtype)
        return table


def _norm(hf_layer: nn.Module, name: str, unit_offset: bool) -> ExpertNorm:
    mod = attrgetter(name)(hf_layer)
    eps = getattr(mod, "variance_epsilon", None) or mod.eps
    return ExpertNorm(mod.weight, eps, unit_offset=unit_offset)


class DecoderLayer(nn.Module):
    """One decoder layer of any supported family over the Hugging Face layer's weights (module docstring)."""

    def __init__(self, hf_layer: nn.Module, spec: FamilySpec, index: int, backend: DeltaBackend) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        hd = spec.head_dim
        self.heads, self.kv_heads, self.head_dim = spec.heads, spec.kv_heads, hd
        self.attn = AttentionSpec(spec.attn_scale, spec.attn_softcap, spec.windows[index])
        self.rope_key = spec.rope_keys[index]
        # role -> Hugging Face name of the norm (its parameter is "<name>.weight")
        roles = ({"norm1": "input_layernorm", "attn_out_norm": "post_attention_layernorm",
                  "norm2": "pre_feedforward_layernorm", "mlp_out_norm": "post_feedforward_layernorm"}
                 if spec.sandwich_norms else {"norm1": "input_layernorm", "norm2": "post_attention_layernorm"})
        if spec.qk_norm:
            roles |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
        self._norm_names: dict[str, ExpertNorm] = {}
        for role in ("norm1", "norm2", "attn_out_norm", "mlp_out_norm", "q_norm", "k_norm"):
            norm = _norm(hf_layer, roles[role], spec.norm_unit_offset) if role in roles else None
            setattr(self, role, norm)
            if norm is not None:
                self._norm_names[roles[role]] = norm
        self.o, self.down = ExpertLinear(attn.o_proj, backend), ExpertLinear(mlp.down_proj, backend)
        self.q = self.k = self.v = self.gate = self.up = None
        self.qkv: SharedInputLinears | FusedLinear
        self.gate_up: SharedInputLinears | FusedLinear
        if spec.fused:
            qkv, gate_up = ExpertLinear(attn.qkv_proj, backend), ExpertLinear(mlp.gate_up_proj, backend)
            self.qkv = FusedLinear(qkv, (spec.heads * hd, spec.kv_heads * hd, spec.kv_heads * hd))
            self.gate_up = FusedLinear(gate_up, (gate_up.shape[0] // 2,) * 2)  # gate first (Phi3MLP's chunk)
            self._linears = {"self_attn.qkv_proj": qkv, "self_attn.o_proj": self.o,
                             "mlp.gate_up_proj": gate_up, "mlp.down_proj": self.down}
        else:
            self.q, self.k, self.v = (ExpertLinear(m, backend) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate, self.up = ExpertLinear(mlp.gate_proj, backend), ExpertLinear(mlp.up_proj, backend)
            self.qkv, self.gate_up = SharedInputLinears((self.q, self.k, self.v)), SharedInputLinears((self.gate, self.up))
            self._linears = {"self_attn.q_proj": self.q, "self_attn.k_proj": self.k, "self_attn.v_proj": self.v,
                             "self_attn.o_proj": self.o, "mlp.gate_proj": self.gate, "mlp.up_proj": self.up,
                             "mlp.down_proj": self.down}
        self.act = getattr(mlp, "act_fn", None) or mlp.activation_fn
        # Bias deltas of the unfused layers that have a bias (qwen2's q/k/v; llama's attention_bias, mlp_bias).
        self.biases = {name: ExpertBias(m.base.bias) for name, m in self._linears.items()
                       if m.base.bias is not None and not spec.fused}

    def restack(self) -> None:
        """Group q/k/v and gate/up again after their bases were replaced (:mod:`meswitch.engine.base_blocks`)."""
        if isinstance(self.qkv, SharedInputLinears):
            self.qkv = SharedInputLinears((self.q, self.k, self.v))
            self.gate_up = SharedInputLinears((self.gate, self.up))

    def linears(self) -> dict[str, ExpertLinear]:
        """Every linear layer under its Hugging Face module name within the layer (``self_attn.q_proj``, ...)."""
        return dict(self._linears)

    def norms(self) -> dict[str, ExpertNorm | ExpertBias]:
        """Every per-expert vector under its Hugging Face parameter name within the layer: the norms'
        weights (``input_layernorm.weight``, ...) and the linear layers' biases (``self_attn.q_proj.bias``)."""
        return {**{f"{n}.weight": m for n, m in self._norm_names.items()},
                **{f"{n}.bias": m for n, m in self.biases.items()}}

    def _bias(self, name: str, y: Tensor, seg: Segments, rows: Tensor) -> Tensor:
        b = self.biases.get(name)
        return y if b is None else b(y, seg, rows)

    def _qkv(self, x: Tensor, batch: StepBatch) -> Tensor:
        """``x: [T, D]`` -> ``[T, H + 2 H_kv, hd]``: the q, k and v heads side by side in one tensor, bias deltas
        added and q/k normed in place, not yet rotated."""
        seg = batch.segments
        t, hd = x.shape[0], self.head_dim
        qkv = self.qkv.joint(x, seg).view(t, -1, hd)
        kvh = self.kv_heads
        parts = qkv.split((self.heads, kvh, kvh), 1) if self.biases or self.q_norm is not None else ()
        if self.biases:
            for n, part in zip("qkv", parts, strict=True):
                b = self.biases.get(f"self_attn.{n}_proj")
                if b is not None:
                    b.add_(part.flatten(1), seg, batch.table_rows)  # a view of qkv: the sum lands in it
        if self.q_norm is not None:
            for norm, part in ((self.q_norm, parts[0]), (self.k_norm, parts[1])):
                part.copy_(norm(part, seg, batch.expert_rows, batch.table_rows))
        return qkv

    def forward(self, h: Tensor, batch: StepBatch, rope: dict[str | None, tuple[Tensor, Tensor]], cache: KVCache,
                index: int) -> Tensor:
        """``h: [T, D]`` -> ``[T, D]``; ``rope``: per rope key of the model, ``(cos, signed sin)`` ``[T, 1, 2, r / 2]``
        (:func:`~meswitch.engine.attention.rope_tables`, last dim unflattened)."""
        seg, rows, trows = batch.segments, batch.expert_rows, batch.table_rows
        qkv = self._qkv(self.norm1(h, seg, rows, trows), batch)  # [T, H + 2 H_kv, hd]
        cos, sin = rope[self.rope_key]
        half, hd = cos.shape[-1], self.head_dim
        # q and k heads in one go, in place: their first r dims as two halves, [T, H + H_kv, 2, r / 2]
        rope_(head_view(qkv, 0, (self.heads + self.kv_heads, 2, half), (hd, half, 1)), cos, sin)
        a = self.o(attention_heads(qkv, self.heads, batch, cache, index, self.attn), seg)
        a = self._bias("self_attn.o_proj", a, seg, rows)
        if self.attn_out_norm is not None:
            a = self.attn_out_norm(a, seg, rows, trows)
        h = h + a
        x = self.norm2(h, seg, rows, trows)
        y, (wg, wu) = self.gate_up.joint(x, seg), self.gate_up.widths  # [T, I + I]
        gate, up = head_view(y, 0, (wg,), (1,)), head_view(y, wg, (wu,), (1,))  # its two column blocks (2 calls; split: 3)
        if self.biases:
            gate, up = self._bias("mlp.gate_proj", gate, seg, rows), self._bias("mlp.up_proj", up, seg, rows)
        m = self._bias("mlp.down_proj", self.down(self.act(gate) * up, seg), seg, rows)
        if self.mlp_out_norm is not None:
            m = self.mlp_out_norm(m, seg, rows, trows)
        return h + m


class ServingModel(nn.Module):
    """A Hugging Face causal LM of a supported family rewired for multi-expert, continuously batched decoding.

    The Hugging Face modules' weights are shared, not copied: each layer's q/k/v and gate/up
    parameters become views of one stacked tensor (:class:`SharedInputLinears`), same values, so
    the Hugging Face model still runs as before. ``forward(ids: int64 [T], batch,
    cache) -> logits: float32 [S, V]`` for the last token of each sequence in ``batch``. ``backend``
    (:mod:`meswitch.engine.backends`) holds and applies every linear layer's expert deltas.
    :class:`UnsupportedModelError` for a family outside :data:`SUPPORTED` (:mod:`meswitch.engine.families`).
    """

    def __init__(self, hf_model: nn.Module, backend: DeltaBackend) -> None:
        super().__init__()
        cfg = hf_model.config
        self.spec = spec = FamilySpec.from_config(cfg)
        self.config = cfg
        inner = hf_model.model
        self.embed = ExpertEmbedding(inner.embed_tokens, spec.embed_scale)
        self.backend = backend
        self.layers = nn.ModuleList(DecoderLayer(layer, spec, i, backend) for i, layer in enumerate(inner.layers))
        self.norm = _norm(inner, "norm", spec.norm_unit_offset)
        self.lm_head = ExpertLinear(hf_model.lm_head, backend)
        self.rotary = inner.rotary_emb
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.kv_heads, self.head_dim = spec.kv_heads, spec.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the base's dtype (its linear weights may be GGUF blocks)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def linears(self) -> Iterator[tuple[str, ExpertLinear]]:
        """Every delta-capable linear layer under its Hugging Face module name."""
        for i, layer in enumerate(self.layers):
            for name, mod in layer.linears().items():
                yield f"model.layers.{i}.{name}", mod
        yield "lm_head", self.lm_head

    def norms(self) -> Iterator[tuple[str, ExpertNorm | ExpertBias]]:
        """Every per-expert vector under its Hugging Face parameter name: each RMSNorm's weight and each
        (unfused) linear layer's bias; their stored deltas are dense, applied per row's expert."""
        for i, layer in enumerate(self.layers):
            for name, mod in layer.norms().items():
                yield f"model.layers.{i}.{name}", mod
        yield "model.norm.weight", self.norm

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(len(self.layers), slots, self.kv_heads, self.head_dim, max_len, self.dtype, self.device)

    def _rope(self, h: Tensor, batch: StepBatch, key: str | None) -> tuple[Tensor, Tensor]:
        """``(cos, signed sin)``, each ``[T, 1, 2, r / 2]`` in ``h``'s dtype (:func:`~meswitch.engine.attention.rope_tables`
        with the last dim as two halves, for :func:`~meswitch.engine.attention.rope_`),
        from transformers' rotary embedding: over the whole step, or sequence by sequence where the
        frequencies depend on the positions given (longrope)."""
        args = () if key is None else (key,)
        pos = batch.positions
        if not self.spec.rope_per_sequence:
            cos, sin = self.rotary(h[None], pos[None], *args)
        else:
            parts, row = [], 0
            for s in batch.seqs:
                parts.append(self.rotary(h[None, row : row + s.n], pos[None, row : row + s.n], *args))
                row += s.n
            cos, sin = torch.cat([c for c, _ in parts], 1), torch.cat([s for _, s in parts], 1)
        half = cos.shape[-1] // 2
        return tuple(t.unflatten(-1, (2, half)) for t in rope_tables(cos[0].to(h.dtype), sin[0].to(h.dtype)))

    @torch.inference_mode()
    def forward(self, ids: Tensor, batch: StepBatch, cache: KVCache) -> Tensor:
        seg, rows = batch.segments, batch.expert_rows
        h = self.embed(ids, seg, rows)  # [T, D]
        rope = {key: self._rope(h, batch, key) for key in dict.fromkeys(self.spec.rope_keys)}
        for i, layer in enumerate(self.layers):
            h = layer(h, batch, rope, cache, i)
        for s in batch.seqs:
            cache.lengths[s.slot] = s.start + s.n
        last_seg = batch.last_segments()
        if last_seg is batch.segments:  # a decode step: every row is a sequence's last
            last, last_rows, table_rows = h, batch.expert_rows, batch.table_rows
        else:
            last = h.index_select(0, batch.last_rows)  # [S, D]
            last_rows, table_rows = torch.tensor(last_seg.expert_ids, device=h.device), None
        logits = self.lm_head(self.norm(last, last_seg, last_rows, table_rows), last_seg)
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
