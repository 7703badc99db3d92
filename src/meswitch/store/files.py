"""Files of a delta store: the writer lock, emptiness check before create, hashing and verification
(and the memory of files already verified)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
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
    check_size(name, entry, path, _stat(name, path).st_size)
    _, sha = hash_file(path)
    if sha != entry["sha256"]:
        raise CorruptStoreError(
            f"{path}: expert {name!r} file sha256 {sha} differs from manifest {entry['sha256']}; the file is corrupt"
        )


class VerifiedFiles:
    """Expert files whose size and SHA-256 (and layer hashes) matched the manifest, remembered so that a
    file is hashed once, not on every load. A file is known by its path, size and modification time
    (nanoseconds) and by the manifest entry it was checked against: a file replaced or rewritten on disk,
    or an entry rewritten in the manifest, is verified again. Thread-safe."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int, int, str]] = set()
        self._lock = threading.Lock()

    def check(self, name: str, entry: Mapping[str, Any], path: Path) -> tuple[bool, tuple[str, int, int, str]]:
        """``(known, key)``: whether ``path`` was verified against ``entry`` before; CorruptStoreError if the
        file is missing or its size differs from the manifest (checked every time: one ``stat``)."""
        st = _stat(name, path)
        check_size(name, entry, path, st.st_size)
        key = _key(entry, path, st)
        with self._lock:
            return key in self._seen, key

    def remember(self, key: tuple[str, int, int, str], path: Path) -> None:
        """Record a file verified under ``key`` unless it changed on disk while it was being read."""
        try:
            st = path.stat()
        except OSError:
            return
        if (st.st_size, st.st_mtime_ns) == key[1:3]:
            with self._lock:
                self._seen.add(key)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._seen = {k for k in self._seen if k[0] != str(path)}

    def __len__(self) -> int:
        return len(self._seen)


def _stat(name: str, path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise CorruptStoreError(f"{path}: file of expert {name!r} is missing") from None


def _key(entry: Mapping[str, Any], path: Path, st: os.stat_result) -> tuple[str, int, int, str]:
    # the entry's identity: its file hash and every layer's hash (an edited manifest is checked again)
    h = hashlib.sha256(entry["sha256"].encode())
    for layer in sorted(entry["layers"]):
        h.update(entry["layers"][layer]["sha256"].encode())
    return str(path), st.st_size, st.st_mtime_ns, h.hexdigest()


def check_size(name: str, entry: Mapping[str, Any], path: Path, size: int) -> None:
    want = entry["bytes"]
    if size != want:
        what = "truncated" if size < want else "larger than recorded"
        raise CorruptStoreError(f"{path}: expert {name!r} file is {what}: {size} bytes, manifest says {want}")
