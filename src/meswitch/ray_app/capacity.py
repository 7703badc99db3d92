"""How many engine replicas a fleet needs: memory per replica for a base shape, K experts and bits per parameter.

Pure arithmetic over a model's published shape (no weights), on top of
:mod:`meswitch.eval.projection` (shapes, bytes per expert, KV cache): the base is held in fp16, an
expert as its linear deltas at the store's measured ``bits_per_param`` plus fp16 norm deltas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meswitch.eval.projection import MODELS, ModelShape, expert_bytes, kv_cache_bytes

GIB = 1 << 30
MISTRAL_7B = MODELS["Mistral-7B"]
__all__ = ["GIB", "MISTRAL_7B", "ModelShape", "ReplicaPlan", "expert_bytes", "kv_cache_bytes",
           "max_experts_per_replica", "plan", "whole_model_replicas"]


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
    return max(0, int(free // expert_bytes(shape, bits_per_param, int4_cache=int4_cache)))


def plan(shape: ModelShape, experts: int, k: int, bits_per_param: float, kv_bytes: int,
         int4_cache: bool = False) -> ReplicaPlan:
    """Memory per replica holding ``k`` of ``experts`` experts, and the replicas needed to hold them all."""
    k = max(1, min(k, experts))
    return ReplicaPlan(experts, k, 2 * shape.params, k * expert_bytes(shape, bits_per_param, int4_cache=int4_cache), kv_bytes,
                       math.ceil(experts / k))


def whole_model_replicas(shape: ModelShape, experts: int, device_bytes: int, kv_bytes: int) -> tuple[int, int]:
    """(fp16 models per replica, replicas) when every expert is a whole model (Ray's own multiplexing)."""
    per = max(0, int((device_bytes - kv_bytes) // (2 * shape.params)))
    return per, (math.ceil(experts / per) if per else 0)
