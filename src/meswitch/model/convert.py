"""Stream a checkpoint's 16-bit weights into one float32 safetensors file, one tensor in memory at a time.

Hugging Face maps a float32 safetensors file into memory and uses its pages as the weights: they
are file pages the kernel can drop and read again, not the process's own memory. Weights stored in
fp16 or bf16 would instead be converted into anonymous memory, a whole model's worth. Writing the
float32 copy to disk first, tensor by tensor, keeps every checkpoint on the mapped path.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch

from meswitch.model.layout import Layout

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = ("F16", "BF16", "F64")  # converted to F32; other dtypes are copied as they are
CONFIG_FILES = ("config.json", "generation_config.json")


def needs_float32_copy(layout: Layout) -> bool:
    """Whether any floating-point tensor of ``layout`` is stored in another width than float32."""
    return any(t.dtype in FLOATS for t in layout.tensors.values())


def write_float32_copy(layout: Layout, out_dir: Path) -> Path:
    """Write ``layout``'s config files and its weights as one float32 ``model.safetensors`` in ``out_dir``.

    Floating-point tensors become F32, others keep their dtype; one tensor is read (memory-mapped),
    converted and written at a time. Returns ``out_dir``.
    """
    from safetensors import safe_open

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        if (layout.path / name).is_file():
            shutil.copyfile(layout.path / name, out_dir / name)
    names = sorted(layout.tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        info = layout.tensors[name]
        dtype = "F32" if info.dtype in FLOATS else info.dtype
        size = math.prod(info.shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(info.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(layout.tensors[name].file, []).append(name)
    handles = {f: safe_open(str(layout.path / f), framework="pt") for f in by_file}
    with open(out_dir / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:  # in header order: each tensor's bytes where its offsets say
            t = handles[layout.tensors[name].file].get_tensor(name)
            if t.is_floating_point():
                t = t.to(torch.float32)
            out.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t
    return out_dir
