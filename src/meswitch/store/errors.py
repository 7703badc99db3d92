"""Errors of the delta store; each names the store path, expert, file, layer or field it is about."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from meswitch.errors import MeswitchError


class StoreError(MeswitchError):
    """Base class of every error the delta store raises."""


class StoreNotFoundError(StoreError):
    """The store directory or its manifest.json does not exist."""


class CorruptStoreError(StoreError):
    """The manifest or an expert file is unreadable, truncated or fails an integrity check."""


class StoreVersionError(StoreError):
    """The store was written by a newer meswitch than this one."""

    def __init__(self, path: Path, found: int, supported: int):
        self.path, self.found, self.supported = Path(path), found, supported
        super().__init__(
            f"{path}: store format {found} is newer than this meswitch supports ({supported}); upgrade meswitch"
        )


class BaseMismatchError(StoreError):
    """The store was built against a different base model than the one given."""

    def __init__(self, path: Path, expected: str, actual: str):
        self.path, self.expected, self.actual = Path(path), expected, actual
        super().__init__(
            f"{path}: store base fingerprint is {actual}, expected {expected}; "
            "its deltas belong to another base model"
        )


class InvalidNameError(StoreError):
    """An expert name that could escape the store directory or is otherwise unusable."""

    def __init__(self, name: str, reason: str):
        self.name = name
        super().__init__(f"invalid expert name {name!r}: {reason}")


class ExpertExistsError(StoreError):
    """An expert of that name is already stored and overwrite was not asked for."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = Path(path), name
        super().__init__(f"{path}: expert {name!r} already exists; pass overwrite=True to replace it")


class UnknownExpertError(StoreError):
    """No expert of that name is stored."""

    def __init__(self, path: Path, name: str, available: Iterable[str]):
        self.path, self.name, self.available = Path(path), name, sorted(available)
        listing = ", ".join(repr(n) for n in self.available) or "none"
        super().__init__(f"{path}: no expert {name!r}; available: {listing}")


class InvalidEntryError(StoreError):
    """Layers, fields or metadata handed to the store that it cannot record faithfully."""


class InvalidTensorError(StoreError):
    """A tensor the store cannot write or hash (not a tensor, not on the CPU, on the meta device)."""
