"""Fidelity of a stored expert against its uncompressed checkpoint on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meswitch.data.examples import Example
from meswitch.errors import MeswitchError


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
    the expert was compressed from.
    """
    from meswitch.data.chat import padded_batches
    from meswitch.deltas.apply import apply_delta
    from meswitch.eval.fidelity import compare_models
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore, fingerprint_model

    store = DeltaStore.open(store_path)
    entry = store.expert_meta(expert)
    base_dir = Path(base_dir or store.extra.get("base_path") or "")
    reference_dir = Path(reference_dir or entry["meta"].get("reference_path") or "")
    if not base_dir.name:
        raise MeswitchError(f"store {store_path} records no base path: pass --base DIR")
    if not reference_dir.name:
        raise MeswitchError(f"expert {expert!r} records no reference checkpoint: pass --reference DIR")
    base, tok = load_checkpoint(base_dir)
    DeltaStore.open(store_path, expect_fingerprint=fingerprint_model(base))
    layers, _ = store.load_expert(expert)
    layer_meta = {name: {k: v for k, v in m.items() if k not in ("bytes", "sha256", "tensors")}
                  for name, m in entry["layers"].items()}
    apply_delta(base, layers, layer_meta)
    reference, _ = load_checkpoint(reference_dir)
    fid = compare_models(reference, base, padded_batches(examples, tok, max_len, batch_size))
    return {**fid.as_dict(), "bits_per_param": entry["meta"].get("bits_per_param")}
