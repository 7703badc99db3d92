"""Files of a delta store: the writer lock, emptiness check before create, hashing and verification."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from meswitch.store.errors import CorruptStoreError
from meswitch.store.manifest import EXPERTS_DIR, MANIFEST
from meswitch.utils.atomic import TMP_PREFIX
from meswitch.utils.lock import file_lock

LOCK = ".lock"
_CHUNK = 1 << 20


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Exclusive flock on ``root/.lock``; excludes other processes and other threads alike."""
    with file_lock(root / LOCK):
        yield


def check_empty(root: Path) -> None:
    """Refuse to create a store over a directory holding anything but store leftovers."""
    allowed = {LOCK, EXPERTS_DIR}
    others = [p.name for p in root.iterdir() if p.name not in allowed and not p.name.startswith(TMP_PREFIX)]
    experts_dir = root / EXPERTS_DIR
    if experts_dir.is_dir():
        others += [f"{EXPERTS_DIR}/{p.name}" for p in experts_dir.iterdir() if not p.name.startswith(TMP_PREFIX)]
    if others:
        raise CorruptStoreError(
            f"{root} has no {MANIFEST} but is not empty ({', '.join(sorted(others)[:5])}); "
            "refusing to create a delta store over other files"
        )


def hash_file(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file; with ``fsync`` also flush it to disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def verify_file(name: str, entry: Mapping[str, Any], path: Path) -> None:
    """CorruptStoreError naming ``path`` unless its size and SHA-256 match the manifest entry."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CorruptStoreError(f"{path}: file of expert {name!r} is missing") from None
    want = entry["bytes"]
    if size != want:
        what = "truncated" if size < want else "larger than recorded"
        raise CorruptStoreError(f"{path}: expert {name!r} file is {what}: {size} bytes, manifest says {want}")
    _, sha = hash_file(path)
    if sha != entry["sha256"]:
        raise CorruptStoreError(
            f"{path}: expert {name!r} file sha256 {sha} differs from manifest {entry['sha256']}; the file is corrupt"
        )
