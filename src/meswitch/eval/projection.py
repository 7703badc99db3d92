"""Memory of a base plus N compressed experts for real model sizes, from their published shapes.

Pure arithmetic over :class:`ModelShape` (the numbers of the models' published ``config.json``):
what a store of N experts at a measured bits-per-parameter costs in memory, and how many experts fit
in an accelerator of a given size. Weights only: the KV cache and activations come on top.

Assumptions, stated once: the base is held in 16 bit; an expert is a delta on every linear layer of
every block, stored at ``bits_per_param`` (the measured effective rate, salient columns and step
sizes included), plus its norms as 16-bit deltas; embeddings and ``lm_head`` are the base's
(``embedding_delta=True`` counts them as a 16-bit delta per expert instead, for fine-tunes that
change them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama / Mistral layout: q, k, v, o, gate, up, down)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    name: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params_per_layer(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        return attention + 3 * self.hidden * self.intermediate

    @property
    def linear_params(self) -> int:
        """Parameters of every block's linear layers: what an expert's delta covers."""
        return self.layers * self.linear_params_per_layer

    @property
    def embedding_params(self) -> int:
        """Input embedding plus ``lm_head`` (once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params


# From the models' published config.json files.
MODELS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, name="Llama-2-7B"),
        ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000, name="Mistral-7B"),
        ModelShape(hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000, name="Llama-2-13B"),
        ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, name="Llama-3-8B"),
    )
}


def base_bytes(shape: ModelShape, base_bits: int = 16) -> int:
    """The base model's weights."""
    return shape.params * base_bits // 8


def expert_bytes(shape: ModelShape, bits_per_param: float, *, embedding_delta: bool = False,
                 int4_cache: bool = False) -> int:
    """One compressed expert: linear deltas at ``bits_per_param`` and 16-bit norm deltas.

    ``embedding_delta``: plus 16-bit embedding and ``lm_head`` deltas; ``int4_cache``: plus the 4-bit
    copy of the linear deltas the `int4` delta backend keeps beside the packed codes.
    """
    if bits_per_param <= 0:
        raise ValueError(f"bits_per_param must be positive, got {bits_per_param}")
    n = math.ceil(shape.linear_params * bits_per_param / 8) + 2 * shape.norm_params
    if embedding_delta:
        n += shape.embedding_params * 2
    if int4_cache:
        n += shape.linear_params // 2
    return n


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``context`` tokens."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per_value * batch * context


def store_bytes(shape: ModelShape, n_experts: int, bits_per_param: float, embedding_delta: bool = False) -> int:
    """Base plus ``n_experts`` compressed experts."""
    return base_bytes(shape) + n_experts * expert_bytes(shape, bits_per_param, embedding_delta=embedding_delta)


def full_models_bytes(shape: ModelShape, n_experts: int) -> int:
    """``n_experts`` whole 16-bit fine-tuned models: what serving them without deltas holds."""
    return n_experts * base_bytes(shape)


def experts_that_fit(shape: ModelShape, capacity_bytes: int, bits_per_param: float,
                     embedding_delta: bool = False) -> int:
    """How many compressed experts fit beside the base in ``capacity_bytes`` (0 if the base does not)."""
    room = capacity_bytes - base_bytes(shape)
    if room < 0:
        return 0
    return room // expert_bytes(shape, bits_per_param, embedding_delta=embedding_delta)


def full_models_that_fit(shape: ModelShape, capacity_bytes: int) -> int:
    """How many whole 16-bit models fit in ``capacity_bytes``."""
    return capacity_bytes // base_bytes(shape)
