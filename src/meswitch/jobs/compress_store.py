"""Compress experts into a delta store: load the checkpoints, compress each expert, measure it, store it
(PEFT LoRA adapters: read, checked against the base and stored as they are)."""

from __future__ import annotations

import resource
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.errors import MeswitchError

if TYPE_CHECKING:
    import torch

    from meswitch.compress.config import CompressConfig
    from meswitch.compress.pipeline import Hessians
    from meswitch.data.examples import Example


def compress_expert(base: torch.nn.Module, expert: torch.nn.Module, tok: Any, calib: list[Example],
                    cfg: CompressConfig, act_sq: dict[str, torch.Tensor] | None = None,
                    hessians: Hessians | None = None, rung_cache: dict | None = None
                    ) -> tuple[dict, dict, dict[str, Any]]:
    """``meswitch.compress.pipeline.compress_model``, then its result measured against ``expert``.

    ``base`` is modified in place into base + the stored deltas, and compared token by token with
    ``expert`` on the calibration blocks compression never learns from (``held_out_batches``):
    ``info["fidelity_calib"]`` = ``{"kl", "top1", "ppl_ratio", "tokens"}``. ``info["peak_rss_bytes"]``
    covers the measurement too. Returns (layers, layer_meta, info) ready for ``DeltaStore.add_expert``.
    """
    from meswitch.compress.pipeline import compress_model, held_out_batches
    from meswitch.eval.fidelity import compare_models

    layers, meta, info = compress_model(base, expert, tok, calib, cfg, act_sq=act_sq, hessians=hessians,
                                        rung_cache=rung_cache)
    info["fidelity_calib"] = compare_models(expert, base, held_out_batches(tok, calib, cfg)).as_dict()
    info["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return layers, meta, info


def compress_into_store(base_dir: Path, experts: dict[str, Path], store_path: Path,
                        calib: list[Example] | Mapping[str, list[Example]] | None, cfg: CompressConfig,
                        overwrite: bool = True) -> dict[str, dict[str, Any]]:
    """Compress each ``name -> checkpoint dir`` against ``base_dir`` and add it to the store at ``store_path``.

    The store is created if missing (else its base must match ``base_dir``'s fingerprint) and
    records ``base_dir``; each expert records its checkpoint as ``info["reference_path"]``.
    calib: one calibration set for every expert, or ``{name: examples}`` (e.g. each expert's own
    domain text, as ``meswitch compress --zoo`` does). Returns ``{name: info}`` as stored.

    Every checkpoint's files are checked before anything is loaded (:mod:`meswitch.model.layout`:
    shards present and whole; an expert of another architecture, vocabulary, tying or shapes is
    refused naming the tensor and file); weights may be fp32, fp16 or bf16, one file or sharded.
    A directory with ``adapter_config.json`` is a PEFT LoRA adapter (:mod:`meswitch.jobs.peft_adapter`):
    its factors are stored as they are (16 bit, no calibration; ``info["adapter_path"]``). Every
    adapter is read and checked against the base before the store is created or written to.
    """
    from meswitch.jobs.peft_adapter import is_adapter, read_adapter
    from meswitch.model.checkpoint import load_checkpoint, load_model
    from meswitch.model.layout import check_expert_layout, read_layout
    from meswitch.store import DeltaStore, base_info, fingerprint_model
    from meswitch.store.manifest import check_name

    adapter_dirs = {name: Path(d) for name, d in experts.items() if is_adapter(Path(d))}
    base_layout = read_layout(Path(base_dir))
    layouts = {}  # expert name -> its checked layout, read once
    for name, exp_dir in experts.items():
        check_name(name)  # fail before minutes of work, not after
        if name in adapter_dirs:
            continue
        if not (Path(exp_dir) / "config.json").is_file():
            raise MeswitchError(f"expert {name!r}: {exp_dir} has no config.json (a Hugging Face checkpoint) and no "
                                "adapter_config.json (a PEFT LoRA adapter)")
        layouts[name] = read_layout(Path(exp_dir))
        check_expert_layout(base_layout, layouts[name], name)
        if calib is None or (isinstance(calib, Mapping) and name not in calib):
            raise MeswitchError(f"no calibration text for expert {name!r}")
    base, tok = load_checkpoint(base_dir, layout=base_layout)
    adapters = {name: read_adapter(d, base, Path(base_dir)) for name, d in adapter_dirs.items()}
    store = DeltaStore.create(store_path, fingerprint_model(base), base_info(base))
    store.set_extra("base_path", str(Path(base_dir).resolve()))
    results = {}
    for name, exp_dir in experts.items():
        if name in adapters:
            layers, meta, info = adapters.pop(name)
            store.add_expert(name, layers, meta, info, overwrite=overwrite)
            results[name] = info
            continue
        if base is None:  # compression edits the base in place: a fresh copy per expert
            base, tok = load_checkpoint(base_dir, layout=base_layout)
        expert = load_model(exp_dir, layout=layouts[name])  # the base's tokenizer is the expert's (same vocabulary, checked)
        layers, meta, info = compress_expert(base, expert, tok, calib[name] if isinstance(calib, Mapping) else calib,
                                             cfg)
        info["reference_path"] = str(Path(exp_dir).resolve())
        store.add_expert(name, layers, meta, info, overwrite=overwrite)
        results[name] = info
        base = None
        del expert, layers
    return results
