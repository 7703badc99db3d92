"""What a store holds, in the numbers people compare: bits per parameter, bytes, ratio, fidelity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meswitch.store.store import DeltaStore


def summarize(path: Path) -> dict[str, Any]:
    """``{"experts": {name: {...}}, "footprint": {...}, "base": {...}}`` for the store at ``path``.

    bytes: the expert's file on disk (every tensor and the safetensors header);
    ratio_vs_fp16: an fp16 copy of the whole expert against those bytes.
    """
    store = DeltaStore.open(path)
    experts: dict[str, Any] = {}
    for name in store.experts:
        entry = store.expert_meta(name)
        meta = entry["meta"]
        file_bytes = int(entry["bytes"])
        fp16 = int(meta.get("fp16_expert_bytes", 0))
        experts[name] = {
            "method": meta.get("config", {}).get("method"),
            "bits": meta.get("config", {}).get("bits"),
            "bits_per_param": meta.get("bits_per_param"),
            "bytes": file_bytes,
            "ratio_vs_fp16": fp16 / file_bytes if file_bytes else None,
            "fidelity": meta.get("fidelity") or meta.get("fidelity_calib", {}),
            "layers": len(entry["layers"]),
        }
    n = len(experts)
    fp16_expert = max((store.expert_meta(e)["meta"].get("fp16_expert_bytes", 0) for e in store.experts), default=0)
    store_bytes = fp16_expert + sum(e["bytes"] for e in experts.values())  # the base itself, in fp16
    return {
        "experts": experts,
        "base": store.base,
        "footprint": {
            "experts": n,
            "store_bytes": store_bytes,
            "fp16_experts_bytes": n * fp16_expert,
            "ratio": (n * fp16_expert / store_bytes) if store_bytes else None,
        },
    }
