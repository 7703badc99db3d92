"""What each supported Hugging Face model family adds to the engine's one decoder (``engine/model.py``).

A :class:`FamilySpec` is read once from a model's config (``model_type`` picks the family; keys the
engine does not use are ignored, missing ones take transformers' defaults). What differs:

| family | beyond Llama |
|---|---|
| ``llama`` | nothing (``rope_scaling``, e.g. Llama 3's, lives in transformers' rotary embedding, reused as is) |
| ``mistral`` | ``sliding_window`` on every layer |
| ``qwen2`` | q/k/v biases (read from the modules); a window on the layers ``layer_types`` marks sliding (only with ``use_sliding_window``) |
| ``qwen3`` | per-head RMSNorm of q and k before rope (``q_norm``, ``k_norm``); windows as qwen2 |
| ``gemma2`` | norms ``x * (1 + w)`` in float32, four per layer; embeddings times ``sqrt(hidden_size)``; scores scaled by ``query_pre_attn_scalar ** -0.5``; attention and final logit soft-capping; local (sliding) and global layers from ``layer_types``; gelu-tanh MLP |
| ``gemma3_text`` | gemma2's, plus q/k norms and a rope per layer type (``rope_local_base_freq`` on local layers); no attention soft-capping (transformers applies none) |
| ``phi3`` | fused ``qkv_proj`` and ``gate_up_proj``; partial rotary (``partial_rotary_factor``); ``sliding_window`` on every layer; ``longrope`` (rope per sequence) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meswitch.engine.errors import UnsupportedModelError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
_WINDOW_ON_EVERY_LAYER = ("mistral", "phi3")  # their attention takes config.sliding_window whatever layer_types says
_WINDOW_BY_LAYER_TYPE = ("qwen2", "qwen3", "gemma2", "gemma3_text")
# Frequencies that depend on earlier forwards (cached growth and resets): no step of a batch can reproduce them.
_UNSUPPORTED_ROPE = ("dynamic",)
# Frequencies chosen by the longest position of a forward: computed sequence by sequence.
_PER_SEQUENCE_ROPE = ("longrope",)


@dataclass(frozen=True)
class FamilySpec:
    """How one model's decoder layers differ from Llama's (module docstring); per-layer tuples have one entry per layer.

    ``windows[i]``: layer ``i``'s sliding window (a key at distance ``>= window`` is hidden), None: full
    causal attention. ``rope_keys[i]``: the ``layer_type`` argument of the rotary embedding (Gemma 3's
    per-type ropes), None: it takes none. ``norm_unit_offset``: norms compute ``x * (1 + w)`` in float32.
    ``sandwich_norms``: a norm after attention and one before and after the MLP (4 per layer).
    ``qk_norm``: per-head norms of q and k before rope. ``fused``: ``qkv_proj`` and ``gate_up_proj``.
    ``rope_per_sequence``: the rotary embedding runs once per sequence of a step (``longrope`` picks its
    short or long factors by the last position it is given, as in transformers' one-sequence decoding).
    """

    family: str
    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]
    rope_keys: tuple[str | None, ...]
    attn_scale: float
    attn_softcap: float | None = None
    final_softcap: float | None = None
    embed_scale: float | None = None
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    qk_norm: bool = False
    fused: bool = False
    rope_per_sequence: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> FamilySpec:
        """The spec of a transformers config; :class:`UnsupportedModelError` for another family or an
        attention/rope variant the engine cannot reproduce exactly."""
        family = getattr(cfg, "model_type", None)
        if family not in SUPPORTED:
            raise UnsupportedModelError(f"the engine runs {', '.join(SUPPORTED)} models; this base is {family!r}")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{family}: bidirectional attention is not supported by the engine")
        ropes = _rope_types(cfg)
        for rope in ropes:
            if rope in _UNSUPPORTED_ROPE:
                raise UnsupportedModelError(f"{family}: rope_type {rope!r} is not supported by the engine (its "
                                            "frequencies depend on earlier forwards)")
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        n = cfg.num_hidden_layers
        common: dict[str, Any] = {
            "family": family, "heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": head_dim, "windows": _windows(cfg, family, n), "rope_keys": (None,) * n,
            "attn_scale": head_dim**-0.5, "rope_per_sequence": any(r in _PER_SEQUENCE_ROPE for r in ropes),
        }
        return cls(**{**common, **_EXTRAS.get(family, _nothing)(cfg)})


def _nothing(cfg: Any) -> dict[str, Any]:
    return {}


def _gemma(cfg: Any) -> dict[str, Any]:
    return {"norm_unit_offset": True, "sandwich_norms": True, "embed_scale": cfg.hidden_size**0.5,
            "attn_scale": getattr(cfg, "query_pre_attn_scalar", 256) ** -0.5,
            "attn_softcap": getattr(cfg, "attn_logit_softcapping", None),
            "final_softcap": getattr(cfg, "final_logit_softcapping", None)}


def _gemma3(cfg: Any) -> dict[str, Any]:
    return {**_gemma(cfg), "attn_softcap": None, "qk_norm": True, "rope_keys": tuple(cfg.layer_types)}


_EXTRAS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "qwen3": lambda cfg: {"qk_norm": True},
    "gemma2": _gemma,
    "gemma3_text": _gemma3,
    "phi3": lambda cfg: {"fused": True},
}


def _windows(cfg: Any, family: str, n: int) -> tuple[int | None, ...]:
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return (None,) * n
    if family in _WINDOW_ON_EVERY_LAYER:
        return (int(window),) * n
    if family in _WINDOW_BY_LAYER_TYPE:
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * n
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    return (None,) * n  # llama: transformers ignores a sliding_window key


def _rope_types(cfg: Any) -> list[str | None]:
    """The rope type(s) of a config: one, or one per layer type (Gemma 3's nested ``rope_parameters``)."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        return []
    nested = [p for p in params.values() if isinstance(p, dict)]
    return [p.get("rope_type", p.get("type")) for p in nested] or [params.get("rope_type", params.get("type"))]
