"""Base-model identity: a SHA-256 fingerprint over weights, and a short description of the base.

A store records the fingerprint of the base its deltas were computed from, so deltas are never
applied to another base. The fingerprint depends only on tensor names, dtypes, shapes and values:
a tied model and an untied copy with equal weights hash the same, and tied storages are hashed once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from meswitch.store.errors import InvalidTensorError

if TYPE_CHECKING:
    import torch
    from torch import nn


def dtype_name(t: torch.Tensor) -> str:
    """``torch.float16`` -> ``"float16"``: the dtype as the manifest records it."""
    return str(t.dtype).removeprefix("torch.")


def cpu_contiguous(name: str, t: Any) -> torch.Tensor:
    """The tensor, detached, on the CPU and contiguous; InvalidTensorError naming ``name`` if impossible."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise InvalidTensorError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise InvalidTensorError(f"{name}: tensor is on the meta device and has no data")
    return t.detach().cpu().contiguous()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor in memory order, without a copy (bfloat16 and 0-dim included)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_header(name: str, t: torch.Tensor) -> bytes:
    """``name \\0 dtype \\0 shape-json \\0``: what identifies a tensor apart from its values."""
    return f"{name}\0{dtype_name(t)}\0{json.dumps(list(t.shape))}\0".encode()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex over ``tensors`` in sorted name order: header, 8-byte length, then the raw bytes.

    Expects contiguous CPU tensors (see ``cpu_contiguous``); used for per-layer hashes in the manifest.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        data = raw_bytes(tensors[name])
        h.update(tensor_header(name, tensors[name]))
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def fingerprint_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex identifying a set of named tensors (any device, any layout).

    Hashes, in sorted name order, each tensor's header (name, dtype, shape) and the SHA-256 of its raw
    bytes. Views of the same storage (tied weights) reuse one data digest instead of hashing twice.
    """
    digests: dict[tuple, bytes] = {}
    h = hashlib.sha256(b"meswitch-fingerprint-v1\0")
    for name in sorted(state):
        t = state[name]
        key = None
        if hasattr(t, "untyped_storage") and not t.is_meta:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                   tuple(t.shape), t.stride())
        digest = digests.get(key) if key is not None else None
        t = cpu_contiguous(name, t)
        if digest is None:
            digest = hashlib.sha256(raw_bytes(t)).digest()
            if key is not None and t.numel() > 0:
                digests[key] = digest
        h.update(tensor_header(name, t))
        h.update(digest)
    return h.hexdigest()


def fingerprint_model(model: nn.Module) -> str:
    """Fingerprint of ``model.state_dict()`` (parameters and persistent buffers)."""
    return fingerprint_state_dict(model.state_dict())


def base_info(model: nn.Module) -> dict[str, Any]:
    """What a store records about its base, beside the fingerprint: architecture, sizes, parameter count."""
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
