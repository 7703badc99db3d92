"""How many engine replicas a fleet needs: memory per replica for a base shape, K experts and bits per parameter.

Pure arithmetic over a model's published shape (no weights). An expert is stored as its decoder
linear layers' deltas at ``bits_per_param`` (what the store's manifest measures) plus dense fp16
deltas of the norms; the base is held in fp16; the KV cache is fp16 for ``batch`` sequences of
``context`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder's published shape."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder's linear layers (q, k, v, o, gate, up, down): what experts store as deltas."""
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.linear_params + self.norm_params + embeddings


MISTRAL_7B = ModelShape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=32000)


def expert_bytes(shape: ModelShape, bits_per_param: float, int4_cache: bool = False) -> int:
    """Bytes one resident expert takes: packed linear deltas + fp16 norm deltas (+ a 4-bit kernel copy)."""
    packed = shape.linear_params * bits_per_param / 8 + 2 * shape.norm_params
    return int(packed + (shape.linear_params / 2 if int4_cache else 0))


def kv_cache_bytes(shape: ModelShape, batch: int, context: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for ``batch`` sequences of ``context`` tokens."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * bytes_per_value * batch * context


@dataclass(frozen=True)
class ReplicaPlan:
    """``k`` experts per replica, the bytes one replica holds, and ``replicas`` for ``experts`` in all."""

    experts: int
    k: int
    base_bytes: int
    experts_bytes: int
    kv_bytes: int
    replicas: int

    @property
    def replica_bytes(self) -> int:
        return self.base_bytes + self.experts_bytes + self.kv_bytes


def max_experts_per_replica(shape: ModelShape, bits_per_param: float, device_bytes: int, kv_bytes: int,
                            int4_cache: bool = False) -> int:
    """The most experts beside an fp16 base and ``kv_bytes`` of cache within ``device_bytes`` (0 if none fit)."""
    free = device_bytes - 2 * shape.params - kv_bytes
    return max(0, int(free // expert_bytes(shape, bits_per_param, int4_cache)))


def plan(shape: ModelShape, experts: int, k: int, bits_per_param: float, kv_bytes: int,
         int4_cache: bool = False) -> ReplicaPlan:
    """Memory per replica holding ``k`` of ``experts`` experts, and the replicas needed to hold them all."""
    k = max(1, min(k, experts))
    return ReplicaPlan(experts, k, 2 * shape.params, k * expert_bytes(shape, bits_per_param, int4_cache), kv_bytes,
                       math.ceil(experts / k))


def whole_model_replicas(shape: ModelShape, experts: int, device_bytes: int, kv_bytes: int) -> tuple[int, int]:
    """(fp16 models per replica, replicas) when every expert is a whole model (Ray's own multiplexing)."""
    per = max(0, int((device_bytes - kv_bytes) // (2 * shape.params)))
    return per, (math.ceil(experts / per) if per else 0)
