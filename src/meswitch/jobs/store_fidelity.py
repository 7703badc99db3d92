"""Fidelity of a stored expert against its uncompressed original on held-out text: the checkpoint it was
compressed from, or, for a LoRA expert, the base with its PEFT adapter merged at the adapter's own precision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.data.examples import Example
from meswitch.errors import MeswitchError

if TYPE_CHECKING:
    from torch import nn


def store_fidelity(
    store_path: Path,
    expert: str,
    examples: list[Example],
    base_dir: Path | None = None,
    reference_dir: Path | None = None,
    max_len: int = 512,
    batch_size: int = 4,
) -> dict[str, Any]:
    """KL(expert || compressed), top-1 agreement and perplexity ratio on ``examples``, and the expert's bits per parameter.

    The base (``base_dir``, else the path the store records) is checked against the store's
    fingerprint before anything is computed; the reference is ``reference_dir``, else the checkpoint
    the expert was compressed from (``reference_path``) or, for a LoRA expert, the adapter directory it
    was stored from (``adapter_path``). A reference that is a PEFT adapter directory is merged into a
    copy of the base (:func:`merge_adapter`).
    """
    import copy

    from meswitch.data.chat import padded_batches
    from meswitch.deltas.apply import apply_delta
    from meswitch.eval.fidelity import compare_models
    from meswitch.jobs.peft_adapter import is_adapter
    from meswitch.model.checkpoint import load_checkpoint, load_model
    from meswitch.store import DeltaStore, fingerprint_model

    store = DeltaStore.open(store_path)
    entry = store.expert_meta(expert)
    base_dir = Path(base_dir or store.extra.get("base_path") or "")
    reference_dir = Path(reference_dir or _recorded_reference(expert, entry["meta"]))
    if not base_dir.name:
        raise MeswitchError(f"store {store_path} records no base path: pass --base DIR")
    base, tok = load_checkpoint(base_dir)
    DeltaStore.open(store_path, expect_fingerprint=fingerprint_model(base))
    if is_adapter(reference_dir):
        reference = merge_adapter(copy.deepcopy(base), reference_dir)
    else:
        reference = load_model(reference_dir)  # a fine-tune may be saved without its tokenizer
    layers, _ = store.load_expert(expert)
    layer_meta = {name: {k: v for k, v in m.items() if k not in ("bytes", "sha256", "tensors")}
                  for name, m in entry["layers"].items()}
    apply_delta(base, layers, layer_meta)
    fid = compare_models(reference, base, padded_batches(examples, tok, max_len, batch_size))
    return {**fid.as_dict(), "bits_per_param": entry["meta"].get("bits_per_param")}


def _recorded_reference(expert: str, meta: dict[str, Any]) -> Path:
    """The original an expert's meta records: its adapter directory (a LoRA expert) or its checkpoint;
    :class:`MeswitchError` when it records none, or the adapter directory is gone."""
    if meta.get("adapter_path"):
        path = Path(meta["adapter_path"])
        if not path.is_dir():
            raise MeswitchError(f"expert {expert!r} was stored from the LoRA adapter {path}, which is gone: pass "
                                "--reference DIR (the adapter directory, or a checkpoint with the adapter merged)")
        return path
    if meta.get("reference_path"):
        return Path(meta["reference_path"])
    raise MeswitchError(f"expert {expert!r} records no reference checkpoint: pass --reference DIR")


def merge_adapter(model: nn.Module, adapter: Path) -> nn.Module:
    """``model`` with PEFT adapter directory ``adapter`` merged in place at the adapter's own precision:
    ``W += scale * lora_B @ lora_A`` (float32 products of the saved values, not the store's 16-bit copy)
    for every adapted linear layer, and each ``modules_to_save`` copy in place of its parameter.
    ``scale``: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA), per module from the patterns, as PEFT's.
    Returns ``model``."""
    import torch

    from meswitch.jobs.peft_adapter import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        read_config,
        read_tensors,
        split_keys,
    )

    cfg = read_config(adapter / ADAPTER_CONFIG)
    weights = adapter / ADAPTER_WEIGHTS
    factors, copies = split_keys(weights, read_tensors(weights))
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for module, pair in factors.items():
            w = modules[module].weight
            w += (cfg.scale(module) * (pair["B"].float() @ pair["A"].float())).to(w.dtype)
        for name, t in copies.items():
            params[name].copy_(t)
    return model
