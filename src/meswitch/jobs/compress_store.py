"""Compress experts into a delta store: load the checkpoints, compress each expert, measure it, store it."""

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
                        calib: list[Example] | Mapping[str, list[Example]], cfg: CompressConfig,
                        overwrite: bool = True) -> dict[str, dict[str, Any]]:
    """Compress each ``name -> checkpoint dir`` against ``base_dir`` and add it to the store at ``store_path``.

    The store is created if missing (else its base must match ``base_dir``'s fingerprint) and
    records ``base_dir``; each expert records its checkpoint as ``info["reference_path"]``.
    calib: one calibration set for every expert, or ``{name: examples}`` (e.g. each expert's own
    domain text, as ``meswitch compress --zoo`` does). Returns ``{name: info}`` as stored.
    """
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore, base_info, fingerprint_model
    from meswitch.store.manifest import check_name

    for name in experts:
        check_name(name)  # fail before minutes of work, not after
        if isinstance(calib, Mapping) and name not in calib:
            raise MeswitchError(f"no calibration text for expert {name!r}")
    base, tok = load_checkpoint(base_dir)
    store = DeltaStore.create(store_path, fingerprint_model(base), base_info(base))
    store.set_extra("base_path", str(Path(base_dir).resolve()))
    results = {}
    for name, exp_dir in experts.items():
        if base is None:  # compression edits the base in place: a fresh copy per expert
            base, tok = load_checkpoint(base_dir)
        expert, _ = load_checkpoint(exp_dir)
        layers, meta, info = compress_expert(base, expert, tok, calib[name] if isinstance(calib, Mapping) else calib,
                                             cfg)
        info["reference_path"] = str(Path(exp_dir).resolve())
        store.add_expert(name, layers, meta, info, overwrite=overwrite)
        results[name] = info
        base = None
        del expert, layers
    return results
