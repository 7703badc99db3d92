"""Memory of a base plus N compressed experts for real model sizes, from their published shapes.

Pure arithmetic over :class:`ModelShape` (the numbers of the models' published ``config.json``):
what a store of N experts at a measured bits-per-parameter costs in memory, and how many experts fit
in an accelerator of a given size. Weights only: the KV cache and activations come on top.

Assumptions, stated once: the base is held in 16 bit; an expert is a delta on every linear layer of
every block, stored at ``bits_per_param`` (the measured effective rate, salient columns and step
sizes included); embeddings, ``lm_head`` and norms are the base's (``embedding_delta=True`` counts
them as a 16-bit delta per expert instead, for fine-tunes that change them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape (Llama / Mistral layout: q, k, v, o, gate, up, down)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def linear_params_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
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
        ModelShape("Llama-2-7B", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
        ModelShape("Mistral-7B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000),
        ModelShape("Llama-2-13B", hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
        ModelShape("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256),
    )
}


def base_bytes(shape: ModelShape, base_bits: int = 16) -> int:
    """The base model's weights."""
    return shape.params * base_bits // 8


def expert_bytes(shape: ModelShape, bits_per_param: float, embedding_delta: bool = False) -> int:
    """One compressed expert: its linear deltas at ``bits_per_param`` (+ 16-bit embedding deltas)."""
    if bits_per_param <= 0:
        raise ValueError(f"bits_per_param must be positive, got {bits_per_param}")
    n = math.ceil(shape.linear_params * bits_per_param / 8)
    if embedding_delta:
        n += shape.embedding_params * 2
    return n


def store_bytes(shape: ModelShape, n_experts: int, bits_per_param: float, embedding_delta: bool = False) -> int:
    """Base plus ``n_experts`` compressed experts."""
    return base_bytes(shape) + n_experts * expert_bytes(shape, bits_per_param, embedding_delta)


def full_models_bytes(shape: ModelShape, n_experts: int) -> int:
    """``n_experts`` whole 16-bit fine-tuned models: what serving them without deltas holds."""
    return n_experts * base_bytes(shape)


def experts_that_fit(shape: ModelShape, capacity_bytes: int, bits_per_param: float,
                     embedding_delta: bool = False) -> int:
    """How many compressed experts fit beside the base in ``capacity_bytes`` (0 if the base does not)."""
    room = capacity_bytes - base_bytes(shape)
    if room < 0:
        return 0
    return room // expert_bytes(shape, bits_per_param, embedding_delta)


def full_models_that_fit(shape: ModelShape, capacity_bytes: int) -> int:
    """How many whole 16-bit models fit in ``capacity_bytes``."""
    return capacity_bytes // base_bytes(shape)
