"""The store manifest: its schema, validation on read, and per-layer entries.

``manifest.json`` (format ``meswitch-store``, version 1)::

    {"format": "meswitch-store", "format_version": 1,
     "base": {"fingerprint": str, "architecture": ..., ...},
     "experts": {name: {"file": "experts/<name>.safetensors", "bytes": int, "sha256": str,
                        "created": iso8601 UTC, "meta": {...},
                        "layers": {layer: {...caller meta, "bytes": int, "sha256": str,
                                           "tensors": {field: {"dtype": str, "shape": [int]}}}}}},
     "extra": {...}}

A layer's ``sha256`` covers its tensors in sorted field order (``fingerprint.hash_tensors``); its
``bytes`` is the sum of their ``nbytes``. The expert's ``bytes``/``sha256`` describe the whole file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.store.errors import (
    CorruptStoreError,
    InvalidEntryError,
    InvalidNameError,
    InvalidTensorError,
    StoreNotFoundError,
    StoreVersionError,
)
from meswitch.store.fingerprint import cpu_contiguous, dtype_name, hash_tensors

if TYPE_CHECKING:
    import torch

FORMAT = "meswitch-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXPERTS_DIR = "experts"
KEY_SEP = "::"
RESERVED_LAYER_KEYS = ("bytes", "sha256", "tensors")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: object) -> str:
    """Return ``name`` if it is a safe expert name (also a safe file stem), else InvalidNameError."""
    if not isinstance(name, str):
        raise InvalidNameError(str(name), f"expected a str, got {type(name).__name__}")
    if not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            name, "must be 1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    if ".." in name:
        raise InvalidNameError(name, "must not contain '..'")
    return name


def expert_file(name: str) -> str:
    """Manifest-relative path of an expert's safetensors file."""
    return f"{EXPERTS_DIR}/{name}.safetensors"


def new_manifest(base_fingerprint: str, base_info: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(base_fingerprint, str) or not base_fingerprint:
        raise InvalidEntryError(f"base fingerprint must be a non-empty str, got {base_fingerprint!r}")
    base = {**base_info, "fingerprint": base_fingerprint}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "base": base, "experts": {}, "extra": {}}
    check_json(manifest, "base info")
    return manifest


def check_json(value: object, what: str) -> None:
    """InvalidEntryError unless ``value`` can be written to the JSON manifest."""
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEntryError(f"{what} is not JSON-serialisable: {exc}") from exc


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and validate ``root/manifest.json``; typed errors name the path and the offending key."""
    path = root / MANIFEST
    if not root.is_dir():
        why = "not a directory" if root.exists() else "directory does not exist"
        raise StoreNotFoundError(f"no delta store at {root}: {why}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreNotFoundError(f"no delta store at {root}: {MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptStoreError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptStoreError(f"{path}: manifest is not valid JSON: {exc}") from exc
    validate_manifest(path, manifest)
    return manifest


def validate_manifest(path: Path, m: object) -> None:
    def bad(msg: str) -> CorruptStoreError:
        return CorruptStoreError(f"{path}: {msg}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise bad(f"not a meswitch store manifest: format is {found!r}, expected {FORMAT!r}")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise StoreVersionError(path.parent, version, FORMAT_VERSION)
    base = m.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("fingerprint"), str):
        raise bad("'base' must be an object with a str 'fingerprint'")
    if not isinstance(m.get("experts"), dict):
        raise bad("'experts' must be an object")
    if not isinstance(m.setdefault("extra", {}), dict):
        raise bad("'extra' must be an object")
    for name, entry in m["experts"].items():
        _validate_entry(path, name, entry)


def _validate_entry(path: Path, name: str, entry: object) -> None:
    where = f"{path}: expert {name!r}"
    if not isinstance(entry, dict):
        raise CorruptStoreError(f"{where}: entry must be an object")
    for key, kind in (("file", str), ("bytes", int), ("sha256", str), ("layers", dict), ("meta", dict)):
        if not isinstance(entry.get(key), kind):
            raise CorruptStoreError(f"{where}: {key!r} must be {kind.__name__}, got {entry.get(key)!r}")
    for layer, info in entry["layers"].items():
        if not (isinstance(info, dict) and isinstance(info.get("tensors"), dict)
                and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            raise CorruptStoreError(f"{where}: layer {layer!r} needs 'tensors', 'sha256' and 'bytes'")
        for field, spec in info["tensors"].items():
            if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str)
                    and isinstance(spec.get("shape"), list)):
                raise CorruptStoreError(f"{where}: layer {layer!r} field {field!r} needs 'dtype' and 'shape'")


def prepare_layers(
    name: str,
    layers: Mapping[str, Mapping[str, torch.Tensor]],
    layer_meta: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Check an expert's layers and build (safetensors dict keyed ``layer::field``, manifest layer entries).

    Tensors are detached, made contiguous and must already live on the CPU.
    """
    unknown = sorted(set(layer_meta) - set(layers))
    if unknown:
        raise InvalidEntryError(f"expert {name!r}: layer_meta names layers not in layers: {unknown}")
    flat: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for layer, fields in layers.items():
        _check_key(name, "layer", layer)
        if not fields:
            raise InvalidEntryError(f"expert {name!r}: layer {layer!r} has no tensors")
        extra = dict(layer_meta.get(layer, {}))
        clash = sorted(set(extra) & set(RESERVED_LAYER_KEYS))
        if clash:
            raise InvalidEntryError(
                f"expert {name!r}: layer {layer!r} meta uses keys reserved for the store: {clash}"
            )
        check_json(extra, f"expert {name!r}: meta of layer {layer!r}")
        tensors: dict[str, torch.Tensor] = {}
        for field, t in fields.items():
            _check_key(name, f"layer {layer!r} field", field)
            tensors[field] = _cpu_tensor(f"expert {name!r} layer {layer!r} field {field!r}", t)
        entries[layer] = {
            **extra,
            "bytes": sum(t.nbytes for t in tensors.values()),
            "sha256": hash_tensors(tensors),
            "tensors": {f: {"dtype": dtype_name(t), "shape": list(t.shape)} for f, t in sorted(tensors.items())},
        }
        flat.update({f"{layer}{KEY_SEP}{f}": t for f, t in tensors.items()})
    return _unshare(flat), entries


def _check_key(name: str, what: str, key: object) -> None:
    # Keys are joined as "layer::field"; a ':' at either end would make the split ambiguous.
    if not isinstance(key, str) or not key or KEY_SEP in key or key[0] == ":" or key[-1] == ":":
        raise InvalidEntryError(
            f"expert {name!r}: {what} name {key!r} must be a non-empty str without {KEY_SEP!r} "
            "and not start or end with ':'"
        )


def _cpu_tensor(where: str, t: object) -> torch.Tensor:
    import torch

    if isinstance(t, torch.Tensor) and t.device.type != "cpu":
        raise InvalidTensorError(f"{where}: tensor is on {t.device}; the store takes CPU tensors")
    return cpu_contiguous(where, t)


def _unshare(flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clone tensors that share storage with an earlier one: safetensors refuses shared storage."""
    seen: set[int] = set()
    out = {}
    for key, t in flat.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def split_file_tensors(path: Path, flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"layer::field": t}`` -> ``{layer: {field: t}}``; CorruptStoreError on a key without ``::``."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        layer, sep, field = key.rpartition(KEY_SEP)
        if not sep or not layer or not field:
            raise CorruptStoreError(f"{path}: tensor key {key!r} is not of the form 'layer{KEY_SEP}field'")
        layers.setdefault(layer, {})[field] = t
    return layers


def check_layers(path: Path, entry: Mapping[str, Any], layers: Mapping[str, Mapping[str, torch.Tensor]],
                 hashes: bool = True) -> None:
    """CorruptStoreError naming the layer and field where loaded tensors differ from the manifest entry
    (fields, dtypes, shapes; with ``hashes`` also each layer's SHA-256)."""
    expected = entry["layers"]
    stray = sorted(set(layers) - set(expected))
    if stray:
        raise CorruptStoreError(f"{path}: layer {stray[0]!r} is in the file but not in the manifest")
    for layer, info in expected.items():
        if layer not in layers:
            raise CorruptStoreError(f"{path}: layer {layer!r} is in the manifest but missing from the file")
        got = layers[layer]
        stray = sorted(set(got) - set(info["tensors"]))
        if stray:
            raise CorruptStoreError(f"{path}: layer {layer!r} field {stray[0]!r} is not in the manifest")
        for field, spec in info["tensors"].items():
            if field not in got:
                raise CorruptStoreError(f"{path}: layer {layer!r} field {field!r} is missing from the file")
            t = got[field]
            actual = {"dtype": dtype_name(t), "shape": list(t.shape)}
            want = {"dtype": spec["dtype"], "shape": spec["shape"]}
            if actual != want:
                raise CorruptStoreError(
                    f"{path}: layer {layer!r} field {field!r} is {actual}, manifest says {want}"
                )
        if not hashes:
            continue
        digest = hash_tensors(got)
        if digest != info["sha256"]:
            raise CorruptStoreError(f"{path}: layer {layer!r} sha256 {digest} differs from manifest {info['sha256']}")
