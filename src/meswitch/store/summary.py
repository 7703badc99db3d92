"""What a store holds, in the numbers people compare: bits per parameter, bytes, ratio, fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meswitch.store.store import DeltaStore


def summarize(path: Path) -> dict[str, Any]:
    """``{"experts": {name: {...}}, "footprint": {...}, "base": {...}}`` for the store at ``path``.

    bits_per_param: the decoder's linear layers' bits per weight; bits_per_param_all: the expert's file
    (embeddings, output projection and norms a fine-tune changed included) over every base parameter;
    bytes: the expert's file on disk (every tensor and the safetensors header);
    ratio_vs_fp16: an fp16 copy of the whole expert against those bytes;
    kind: ``lora`` for a LoRA adapter stored as its factors (with its ``rank``), else ``compressed``.
    """
    store = DeltaStore.open(path)
    # an fp16 expert is as large as the fp16 base: same architecture, tied weights counted once
    n_params = int(store.base.get("num_parameters") or 0)
    fp16 = 2 * n_params
    experts: dict[str, Any] = {}
    for name in store.experts:
        entry = store.expert_meta(name)
        meta = entry["meta"]
        file_bytes = int(entry["bytes"])
        method = meta.get("config", {}).get("method")
        experts[name] = {
            "kind": "lora" if method == "lora" else "compressed",
            "method": method,
            "bits": meta.get("config", {}).get("bits"),
            "bits_per_param": meta.get("bits_per_param"),
            "bits_per_param_all": 8 * file_bytes / n_params if n_params else None,
            "bytes": file_bytes,
            "ratio_vs_fp16": fp16 / file_bytes if file_bytes else None,
            "fidelity": meta.get("fidelity") or meta.get("fidelity_calib", {}),
            "layers": len(entry["layers"]),
        }
        if method == "lora":
            experts[name]["rank"] = meta.get("rank")
    n = len(experts)
    store_bytes = fp16 + sum(e["bytes"] for e in experts.values())  # the base itself, in fp16
    return {
        "experts": experts,
        "base": store.base,
        "footprint": {
            "experts": n,
            "store_bytes": store_bytes,
            "fp16_experts_bytes": n * fp16,
            "ratio": (n * fp16 / store_bytes) if store_bytes else None,
        },
    }
