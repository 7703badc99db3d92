"""What a Hugging Face checkpoint directory holds, read from its files' headers before any weight is.

A checkpoint is ``config.json`` plus its weights as one ``model.safetensors`` or as shards listed by
``model.safetensors.index.json``, in fp32, fp16 or bf16. :func:`read_layout` checks that every file is
there and whole (a safetensors header names each tensor's byte range; a file shorter than its
header says is truncated) and returns every tensor's dtype, shape and file without reading a weight.
:func:`check_expert_layout` compares an expert's layout with its base's: the same architecture,
vocabulary, embedding tying and tensor shapes, each difference named with the file it is in.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meswitch.errors import MeswitchError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size


class CheckpointError(MeswitchError, ValueError):
    """A checkpoint directory is incomplete, truncated or unreadable (the message names the file)."""


class CheckpointMismatchError(CheckpointError):
    """An expert's checkpoint is not a fine-tune of the base's architecture, vocabulary or shapes."""


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its safetensors dtype (``"F32"``, ``"BF16"``, ...), shape and file name."""

    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class Layout:
    """A checkpoint directory as its files describe it (nothing loaded)."""

    path: Path
    config: dict[str, Any]
    files: tuple[str, ...]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's part of the config (multimodal configs nest it under ``text_config``)."""
        return self.config.get("text_config") or self.config

    @property
    def vocab_size(self) -> int | None:
        return self.text_config.get("vocab_size")

    @property
    def tied(self) -> bool:
        """Whether the output projection reuses the input embeddings (Hugging Face's default: tied)."""
        return bool(self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings", True)))

    def where(self, name: str) -> str:
        """``name``'s file as a path, for messages."""
        return str(self.path / self.tensors[name].file)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the {what}: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file from its header; raises CheckpointError if the file is
    missing, not safetensors, or shorter than its header says (truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file, or truncated ({size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: its safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: its safetensors header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            out[name] = TensorInfo(str(entry["dtype"]), tuple(int(s) for s in entry["shape"]), path.name)
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: {size} bytes, its header describes {8 + n + end}")
    return out


def _indexed(path: Path) -> tuple[tuple[str, ...], dict[str, TensorInfo]]:
    """The shards an index names and their tensors; every shard present and whole, every tensor where
    the index says it is."""
    index = _read_json(path / INDEX, "safetensors index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path / INDEX}: no 'weight_map' naming each tensor's file")
    files = tuple(sorted(set(map(str, weight_map.values()))))
    for name in files:
        if not (path / name).is_file():
            count = sum(1 for f in weight_map.values() if f == name)
            raise CheckpointError(f"{path / INDEX} names {name!r} for {count} tensors, but {path / name} is missing")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(safetensors_header(path / name))
    for tensor, name in weight_map.items():
        if tensor not in tensors or tensors[tensor].file != name:
            raise CheckpointError(f"{path / INDEX} puts tensor {tensor!r} in {name!r}, which does not hold it")
    return files, tensors


def read_layout(path: Path) -> Layout:
    """Read a checkpoint directory's config and weight headers (no weights).

    Raises CheckpointError naming the file: no directory or config, no safetensors weights (pickled
    ``pytorch_model.bin`` checkpoints are refused with the fix), a missing or truncated shard, an
    index naming a file that is not there or a tensor its file does not hold.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: no {CONFIG}, not a Hugging Face checkpoint")
    config = _read_json(path / CONFIG, "model config")
    if (path / INDEX).is_file():
        files, tensors = _indexed(path)
    elif (path / SINGLE).is_file():
        files, tensors = (SINGLE,), safetensors_header(path / SINGLE)
    elif any((path / p).is_file() for p in PICKLES):
        raise CheckpointError(f"{path}: weights are a pickled pytorch_model.bin; meswitch reads safetensors only "
                              "(re-save with model.save_pretrained(dir, safe_serialization=True))")
    else:
        raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX} (sharded weights)")
    return Layout(path, config, files, tensors)


def _embedding(layout: Layout) -> str | None:
    """The input embedding's tensor name (``model.embed_tokens.weight`` or a nested variant)."""
    hits = [n for n in layout.tensors if n.endswith("embed_tokens.weight")]
    return hits[0] if len(hits) == 1 else None


def check_expert_layout(base: Layout, expert: Layout, name: str = "expert") -> None:
    """Raise CheckpointMismatchError unless ``expert`` is a fine-tune of ``base``'s model: the same
    architecture, vocabulary, embedding tying, tensor names and shapes (dtypes may differ)."""
    who = f"expert {name!r} ({expert.path})"
    if expert.architecture != base.architecture:
        raise CheckpointMismatchError(f"{who} is a {expert.architecture}, the base ({base.path}) a {base.architecture}")
    if expert.vocab_size != base.vocab_size:
        emb = _embedding(expert)
        where = f" ({emb} {list(expert.tensors[emb].shape)} in {expert.where(emb)})" if emb else ""
        raise CheckpointMismatchError(
            f"{who} has a vocabulary of {expert.vocab_size} tokens{where}, the base {base.vocab_size}: an expert "
            "with added or other tokens cannot share the base's tokenizer and embeddings; fine-tune without new "
            "tokens (or map them onto existing ones) to serve it from this base")
    if expert.tied != base.tied:
        raise CheckpointMismatchError(
            f"{who} has tie_word_embeddings={expert.tied}, the base {base.tied}: its output projection and "
            "embeddings would have to be served as different tensors than the base's")
    names_b, names_e = set(base.tensors), set(expert.tensors)
    if names_b != names_e:
        extra, missing = sorted(names_e - names_b), sorted(names_b - names_e)
        what = (f"holds {extra[0]!r} ({expert.where(extra[0])}), which the base has not" if extra
                else f"lacks {missing[0]!r} ({base.where(missing[0])} in the base)")
        raise CheckpointMismatchError(f"{who} {what} ({len(extra) + len(missing)} tensor names differ)")
    for tensor in sorted(names_b):
        sb, se = base.tensors[tensor].shape, expert.tensors[tensor].shape
        if sb != se:
            raise CheckpointMismatchError(f"{who}: tensor {tensor!r} is {list(se)} in {expert.where(tensor)}, "
                                          f"{list(sb)} in the base ({base.where(tensor)})")
