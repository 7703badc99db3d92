"""A GGUF file's scalar metadata and tensor directory, read without materialising its arrays.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every metadata array: for a model
with a 49,152-token vocabulary that is over a million small objects and about 8 seconds on two cores,
before a single tensor is read. Serving a base from a GGUF file's blocks needs only a few scalars
(architecture, heads, sizes) and where each tensor lies, so :func:`read_index` walks the file as the
GGUF specification lays it out (``github.com/ggml-org/ggml/blob/master/docs/gguf.md``) and skips arrays::

    u32 magic "GGUF", u32 version (2 or 3), u64 tensor count, u64 metadata count
    metadata: string key, u32 value type, value        (array: u32 element type, u64 count, elements)
    tensors:  string name, u32 dims, u64 shape[dims] (fastest first), u32 ggml type, u64 offset
    padding to general.alignment (32), then the tensor data, each at data start + offset

A string is a u64 length and that many UTF-8 bytes. Every read is bounds-checked: a truncated or
malformed file raises :class:`GGUFIndexError` naming the file and what was wrong.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
# metadata value type -> struct format of a scalar (8: string, 9: array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class GGUFIndexError(ValueError):
    """The file is not a GGUF file this reader understands, or is cut short (names the file)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the directory: ``shape`` as GGUF lists it (fastest dimension first), ``type`` the ggml
    type's name (``"Q4_1"``), ``offset``/``nbytes`` where its data lies in the file."""

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class GGUFIndex:
    """``metadata``: every scalar and string value (arrays are skipped); ``tensors`` by name, in file order."""

    path: Path
    metadata: dict[str, int | float | bool | str]
    tensors: dict[str, TensorEntry]

    def field(self, key: str) -> int | float | bool | str | None:
        return self.metadata.get(key)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFIndexError(f"{self.path}: cut short at byte {self.pos} (wanted {n} more of {len(self.buf)})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> int | float | bool:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = int(self.unpack("<Q"))
        return self.take(n).decode("utf-8", errors="replace")

    def skip_value(self, vtype: int) -> None:
        if vtype in SCALARS:
            self.take(struct.calcsize(SCALARS[vtype]))
        elif vtype == STRING:
            self.take(int(self.unpack("<Q")))
        elif vtype == ARRAY:
            etype, count = int(self.unpack("<I")), int(self.unpack("<Q"))
            if etype in SCALARS:
                self.take(count * struct.calcsize(SCALARS[etype]))
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise GGUFIndexError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")


def read_index(path: str | Path) -> GGUFIndex:
    """The metadata scalars and tensor directory of the GGUF file at ``path`` (module docstring)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file
            raise GGUFIndexError(f"{path}: empty file, not GGUF") from exc
    with buf:
        c = _Cursor(buf, path)
        if c.take(4) != MAGIC:
            raise GGUFIndexError(f"{path}: not a GGUF file (no 'GGUF' magic)")
        version = c.unpack("<I")
        if version not in (2, 3):
            raise GGUFIndexError(f"{path}: GGUF version {version}, this reader knows 2 and 3")
        n_tensors, n_kv = int(c.unpack("<Q")), int(c.unpack("<Q"))
        meta: dict[str, int | float | bool | str] = {}
        for _ in range(n_kv):
            key, vtype = c.string(), int(c.unpack("<I"))
            if vtype in SCALARS:
                meta[key] = c.unpack(SCALARS[vtype])
            elif vtype == STRING:
                meta[key] = c.string()
            else:
                c.skip_value(vtype)
        infos = []
        for _ in range(n_tensors):
            name, dims = c.string(), int(c.unpack("<I"))
            shape = tuple(int(c.unpack("<Q")) for _ in range(dims))
            infos.append((name, shape, int(c.unpack("<I")), int(c.unpack("<Q"))))
        align = int(meta.get("general.alignment", 32))
        start = -(-c.pos // align) * align
        size = len(buf)
    tensors = {}
    for name, shape, code, offset in infos:
        try:
            qtype = GGMLQuantizationType(code)
        except ValueError as exc:
            raise GGUFIndexError(f"{path}: tensor {name} has unknown ggml type {code}") from exc
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape)) if shape else 1
        if n % block:
            raise GGUFIndexError(f"{path}: tensor {name} of {n} elements is not whole {qtype.name} blocks of {block}")
        entry = TensorEntry(name, shape, qtype.name, start + offset, n // block * block_bytes)
        if entry.offset + entry.nbytes > size:
            raise GGUFIndexError(f"{path}: tensor {name} runs past the end of the file ({entry.offset + entry.nbytes} "
                                 f"> {size} bytes): truncated")
        tensors[name] = entry
    return GGUFIndex(path, meta, tensors)
