"""DeltaStore: a directory of compressed expert deltas against one base model.

Layout::

    STORE/manifest.json                  what is stored (see ``meswitch.store.manifest``)
    STORE/experts/<name>.safetensors     one file per expert, keys "<layer>::<field>"
    STORE/.lock                          writers hold an exclusive flock on it (``files.locked``)

Readers memory-map an expert's file and read its tensors; a file's SHA-256 is checked once per file
(``files.VerifiedFiles``: by path, size and modification time) rather than on every load.

Writers (add, add_experts, remove, set_extra) hold the lock for the whole operation, re-read the manifest inside
it and replace files only by rename, so concurrent writers all land and a crash leaves the manifest
either without the expert or with a complete entry. Readers take no lock. Leftovers of a crash
(temporary siblings, expert files the manifest no longer names) are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.store.errors import (
    BaseMismatchError,
    CorruptStoreError,
    ExpertExistsError,
    InvalidEntryError,
    InvalidNameError,
    UnknownExpertError,
)
from meswitch.store.files import VerifiedFiles, check_empty, hash_file, locked, verify_file
from meswitch.store.manifest import (
    EXPERTS_DIR,
    MANIFEST,
    check_json,
    check_layers,
    check_name,
    expert_file,
    new_manifest,
    prepare_layers,
    read_manifest,
    split_file_tensors,
)
from meswitch.utils.atomic import TMP_PREFIX, atomic_write_json, clean_stale_tmp, fsync_dir, tmp_sibling

if TYPE_CHECKING:
    import torch


class DeltaStore:
    """A store directory; build one with ``DeltaStore.create`` or ``DeltaStore.open``."""

    def __init__(self, path: Path):
        self._root = Path(path)
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self.verified = VerifiedFiles()  # files whose hashes matched, not hashed again while unchanged
        self._manifest()

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, base_fingerprint: str, base_info: Mapping[str, Any]) -> DeltaStore:
        """Create a store at ``path``, or open the existing one if it was made for the same base."""
        root = Path(path)
        manifest = new_manifest(base_fingerprint, base_info)
        if root.exists() and not root.is_dir():
            raise CorruptStoreError(f"cannot create a delta store at {root}: it exists and is not a directory")
        root.mkdir(parents=True, exist_ok=True)
        with locked(root):
            if (root / MANIFEST).exists():
                return cls.open(root, expect_fingerprint=base_fingerprint)
            check_empty(root)
            (root / EXPERTS_DIR).mkdir(exist_ok=True)
            atomic_write_json(root / MANIFEST, manifest)
        return cls(root)

    @classmethod
    def open(cls, path: str | os.PathLike, expect_fingerprint: str | None = None) -> DeltaStore:
        """Open and validate an existing store; BaseMismatchError if its base is not ``expect_fingerprint``."""
        store = cls(Path(path))
        store._check_base(expect_fingerprint)
        return store

    def __repr__(self) -> str:
        return f"DeltaStore({str(self._root)!r}, experts={len(self.experts)})"

    # ---- reading -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._root

    @property
    def base(self) -> dict[str, Any]:
        """The base-model record: ``fingerprint`` plus architecture and sizes."""
        return copy.deepcopy(self._manifest()["base"])

    @property
    def experts(self) -> list[str]:
        return sorted(self._manifest()["experts"])

    @property
    def extra(self) -> dict[str, Any]:
        """Free-form manifest entries set with ``set_extra`` (e.g. a router)."""
        return copy.deepcopy(self._manifest()["extra"])

    def expert_meta(self, name: str) -> dict[str, Any]:
        """The manifest entry of expert ``name`` (file, bytes, sha256, created, meta, layers)."""
        return copy.deepcopy(self._entry(self._manifest(), name))

    def total_bytes(self, name: str) -> int:
        """Size in bytes of the expert's safetensors file."""
        return self._entry(self._manifest(), name)["bytes"]

    def load_expert(
        self, name: str, verify: bool = True
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Load expert ``name`` as ``({layer: {field: tensor}}, manifest entry)``, CPU tensors.

        With ``verify`` the file's size and every layer's fields, dtypes and shapes are checked against
        the manifest on every load, and the file's SHA-256 and each layer's hash the first time the file
        is read (again once it changes on disk: ``VerifiedFiles``); any difference is a CorruptStoreError.
        """
        layers, entry = self.read_expert(name, verify)
        return layers, copy.deepcopy(entry)

    def read_expert(
        self, name: str, verify: bool = True
    ) -> tuple[dict[str, dict[str, torch.Tensor]], Mapping[str, Any]]:
        """:meth:`load_expert` without copying the manifest entry: the entry returned is the store's own
        (shared with other readers and threads; read it, never change it)."""
        from safetensors import SafetensorError, safe_open

        entry = self._entry(self._manifest(), name)
        path = self._file(name, entry)
        known, key = False, None
        if verify:
            known, key = self.verified.check(name, entry, path)
            if not known:
                verify_file(name, entry, path)
        elif not path.is_file():
            raise CorruptStoreError(f"{path}: file of expert {name!r} is missing")
        try:
            with safe_open(path, framework="pt") as f:  # memory-mapped: each tensor's bytes are read once
                flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except (SafetensorError, OSError) as exc:
            raise CorruptStoreError(f"{path}: not a readable safetensors file: {exc}") from exc
        layers = split_file_tensors(path, flat)
        if verify:
            check_layers(path, entry, layers, hashes=not known)
            if key is not None and not known:
                self.verified.remember(key, path)
        return layers, entry

    def check_files(self) -> list[str]:
        """Every expert file that is missing or not the size the manifest records, as one message each
        (empty: all present). One ``stat`` per file, nothing hashed: what a server of thousands of experts
        checks at start-up, hashing each file at its first load (:meth:`read_expert`)."""
        problems = []
        for name, entry in sorted(self._manifest()["experts"].items()):
            try:
                self.verified.check(name, entry, self._file(name, entry))
            except CorruptStoreError as exc:
                problems.append(str(exc))
        return problems

    def verify(self, expect_fingerprint: str | None = None) -> None:
        """Check the base fingerprint (if given) and every expert file's size and SHA-256 (a file verified
        before and unchanged since is not hashed again). Layer hashes are checked at the file's first load."""
        self._check_base(expect_fingerprint)
        experts = self._manifest()["experts"]
        problems = []
        for name, entry in sorted(experts.items()):
            path = self._file(name, entry)
            try:
                known, key = self.verified.check(name, entry, path)
                if not known:
                    verify_file(name, entry, path)
                    self.verified.remember(key, path)
            except CorruptStoreError as exc:
                problems.append(str(exc))
        if problems:
            raise CorruptStoreError(
                f"{self._root}: {len(problems)} of {len(experts)} expert files fail verification:\n  "
                + "\n  ".join(problems)
            )

    # ---- writing -------------------------------------------------------------------------------

    def add_expert(
        self,
        name: str,
        layers: Mapping[str, Mapping[str, torch.Tensor]],
        layer_meta: Mapping[str, Mapping[str, Any]],
        meta: Mapping[str, Any],
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Store expert ``name``: ``layers[layer][field]`` CPU tensors, per-layer and expert metadata.

        Returns the new manifest entry. ExpertExistsError if ``name`` is stored and not ``overwrite``.
        """
        return self.add_experts([(name, layers, layer_meta, meta)], overwrite)[0]

    def add_experts(
        self,
        items: Iterable[tuple[str, Mapping[str, Mapping[str, torch.Tensor]], Mapping[str, Mapping[str, Any]],
                              Mapping[str, Any]]],
        overwrite: bool = False,
    ) -> list[dict[str, Any]]:
        """Store many experts, ``(name, layers, layer_meta, meta)`` each (as :meth:`add_expert`), under one
        lock and one manifest write: a store of thousands of experts is not rewritten once per expert.

        ``items`` is consumed lazily (a generator keeps one expert in memory at a time). After a failure or
        a crash part-way the manifest names no half-written file; files written for experts it does not
        name are removed by the next writer.
        """
        from safetensors.torch import save_file

        entries = []
        with self._writing() as manifest:
            experts = manifest["experts"]
            for name, layers, layer_meta, meta in items:
                check_name(name)
                meta = dict(meta)
                check_json(meta, f"meta of expert {name!r}")
                flat, layer_entries = prepare_layers(name, layers, layer_meta)
                final = self._root / expert_file(name)
                _check_case_clash(name, experts)
                if name in experts and not overwrite:
                    raise ExpertExistsError(self._root, name)
                final.parent.mkdir(exist_ok=True)
                tmp = tmp_sibling(final)
                try:
                    save_file(flat, tmp, metadata={"format": "pt", "meswitch_expert": name})
                    size, sha = hash_file(tmp, fsync=True)
                    self._replace(name, tmp, final, manifest)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                experts[name] = entry = {
                    "file": expert_file(name),
                    "bytes": size,
                    "sha256": sha,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "meta": meta,
                    "layers": layer_entries,
                }
                entries.append(copy.deepcopy(entry))
            if entries:
                fsync_dir(self._root / EXPERTS_DIR)
        return entries

    def _replace(self, name: str, tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
        """Rename the written file into place; an old entry of ``name`` leaves the manifest first.

        A crash between the two must not leave an entry that describes other bytes than the file
        holds; if the rename itself fails the old file is untouched and its entry is put back.
        """
        old = manifest["experts"].pop(name, None)
        if old is not None:
            atomic_write_json(self._root / MANIFEST, manifest)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                manifest["experts"][name] = old
                atomic_write_json(self._root / MANIFEST, manifest)
            raise

    def remove_expert(self, name: str) -> None:
        """Delete expert ``name`` from the manifest, then its file."""
        with self._writing() as manifest:
            entry = self._entry(manifest, name)
            del manifest["experts"][name]
            atomic_write_json(self._root / MANIFEST, manifest)
            self._file(name, entry).unlink(missing_ok=True)

    def set_extra(self, key: str, value: Any) -> None:
        """Set a free-form, JSON-serialisable manifest entry ``extra[key]``."""
        if not isinstance(key, str) or not key:
            raise InvalidEntryError(f"extra key must be a non-empty str, got {key!r}")
        value = copy.deepcopy(value)
        check_json(value, f"extra[{key!r}]")
        with self._writing() as manifest:
            manifest["extra"][key] = value

    # ---- internals -----------------------------------------------------------------------------

    def _manifest(self) -> dict[str, Any]:
        """The validated manifest, re-read whenever the file on disk has been replaced."""
        try:
            st = os.stat(self._root / MANIFEST)
        except (FileNotFoundError, NotADirectoryError):
            return read_manifest(self._root)  # raises StoreNotFoundError naming the path
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cache = self._cache  # one read: another thread may reset it
        if cache is None or cache[0] != key:
            cache = self._cache = (key, read_manifest(self._root))
        return cache[1]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[dict[str, Any]]:
        """Lock, clean leftovers, yield a fresh manifest to modify, write it back atomically on success."""
        with locked(self._root):
            manifest = read_manifest(self._root)
            self._clean_leftovers(manifest)
            yield manifest
            atomic_write_json(self._root / MANIFEST, manifest)
            self._cache = None

    def _clean_leftovers(self, manifest: dict[str, Any]) -> None:
        clean_stale_tmp(self._root, MANIFEST)
        experts_dir = self._root / EXPERTS_DIR
        if not experts_dir.is_dir():
            return
        referenced = {entry["file"] for entry in manifest["experts"].values()}
        for p in experts_dir.iterdir():
            orphan = p.suffix == ".safetensors" and f"{EXPERTS_DIR}/{p.name}" not in referenced
            if p.is_file() and (p.name.startswith(TMP_PREFIX) or orphan):
                p.unlink(missing_ok=True)

    def _check_base(self, expect_fingerprint: str | None) -> None:
        actual = self._manifest()["base"]["fingerprint"]
        if expect_fingerprint is not None and actual != expect_fingerprint:
            raise BaseMismatchError(self._root, expected=expect_fingerprint, actual=actual)

    def _entry(self, manifest: dict[str, Any], name: str) -> dict[str, Any]:
        try:
            return manifest["experts"][name]
        except (KeyError, TypeError):
            raise UnknownExpertError(self._root, name, manifest["experts"]) from None

    def _file(self, name: str, entry: Mapping[str, Any]) -> Path:
        path = self._root / entry["file"]
        if not path.resolve().is_relative_to(self._root.resolve()):
            raise CorruptStoreError(f"{self._root}: expert {name!r} file {entry['file']!r} lies outside the store")
        return path


def _check_case_clash(name: str, experts: Mapping[str, Any]) -> None:
    # On case-insensitive file systems "Math" and "math" would share one file.
    for other in experts:
        if other != name and other.lower() == name.lower():
            raise InvalidNameError(name, f"differs only in case from stored expert {other!r}")
