"""The delta store: compressed expert deltas against one base model, on disk.

``DeltaStore`` keeps one safetensors file per expert and a JSON manifest recording the base-model
fingerprint, per-expert and per-layer metadata, sizes and SHA-256 hashes. Storage only: how deltas
are computed or applied lives elsewhere.
"""

from meswitch.store.errors import (
    BaseMismatchError,
    CorruptStoreError,
    ExpertExistsError,
    InvalidEntryError,
    InvalidNameError,
    InvalidTensorError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownExpertError,
)
from meswitch.store.fingerprint import base_info, fingerprint_model, fingerprint_state_dict
from meswitch.store.manifest import FORMAT, FORMAT_VERSION
from meswitch.store.store import DeltaStore

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BaseMismatchError",
    "CorruptStoreError",
    "DeltaStore",
    "ExpertExistsError",
    "InvalidEntryError",
    "InvalidNameError",
    "InvalidTensorError",
    "StoreError",
    "StoreNotFoundError",
    "StoreVersionError",
    "UnknownExpertError",
    "base_info",
    "fingerprint_model",
    "fingerprint_state_dict",
]
