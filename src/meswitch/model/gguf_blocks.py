"""A GGUF file's linear weights as the raw ggml blocks it stores, under their Hugging Face names.

Shapes: ``out``/``in`` a linear layer's features (Hugging Face ``[out, in]``), ``QK`` = 32 elements
per block (Q4_1, Q8_0), ``row_bytes = in / QK * block_bytes``. A ggml quantized row runs along the
input dimension and each output row is its own run of blocks, so a weight is ``uint8 [out, row_bytes]``
and reordering output rows is reordering rows of bytes. What each block means::

    Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes q   w[j] = d * (q[j] & 15) + m, w[16 + j] = d * (q[j] >> 4) + m
    Q8_0 (34 bytes): fp16 d, 32 int8 q            w[j] = d * q[j]

(:func:`meswitch.engine.kernels.ggml_cpu.reference_dequantize` states them in PyTorch; the kernels there read them.)

llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` of a ``llama`` model for its
rope layout (within each head, the two rotated halves interleaved); :func:`read_blocks` undoes it
as transformers' GGUF loader does, so row ``o`` of a tensor here is output ``o`` of the Hugging Face
module. Types other than :data:`KERNEL_TYPES` (the K-quants, Q5_0, F16, ...) are read all the same,
with :attr:`BlockTensor.has_kernel` False: the caller dequantizes those (:func:`dequantize`) and says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from meswitch.model.gguf_index import GGUFIndex, read_index

KERNEL_TYPES = frozenset({"Q4_1", "Q8_0"})  # ggml types that meswitch's base kernels read directly
# GGUF tensor name (within ``blk.N.``) -> Hugging Face module name (within ``model.layers.N.``)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "ffn_up_gate": "mlp.gate_up_proj",
}
MODEL_NAMES = {"token_embd": "model.embed_tokens", "output": "lm_head"}
ROPE_PERMUTED = frozenset({"llama"})  # architectures whose q/k rows llama.cpp's converter permutes


class GGUFBlocksError(ValueError):
    """A GGUF file's tensors are not what a linear layer's blocks must be (names the file and tensor)."""


@dataclass(frozen=True, eq=False)
class BlockTensor:
    """One linear weight as stored: ``blocks: uint8 [out, row_bytes]`` of ggml ``type``, ``shape = (out, in)``,
    rows in Hugging Face order. ``name``: the Hugging Face parameter (``model.layers.0.self_attn.q_proj.weight``);
    ``gguf_name``: the tensor it was read from (a tied head's is ``token_embd.weight``)."""

    name: str
    gguf_name: str
    type: str
    shape: tuple[int, int]
    blocks: Tensor

    @property
    def has_kernel(self) -> bool:
        """Whether meswitch's kernels read this type (:data:`KERNEL_TYPES`); else dequantize it."""
        return self.type in KERNEL_TYPES

    def nbytes(self) -> int:
        return self.blocks.numel()


def hf_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; ``token_embd.weight`` ->
    ``model.embed_tokens.weight``; ``output.weight`` -> ``lm_head.weight``; None for any other tensor."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
    return f"{MODEL_NAMES[stem]}.weight" if stem in MODEL_NAMES else None


def rope_row_order(rows: int, heads: int) -> Tensor:
    """``int64 [rows]``: Hugging Face row ``i`` of a q or k weight is GGUF row ``order[i]``.

    llama.cpp stores head ``h``'s rows ``(j, i)`` (half ``j`` of 2, index ``i`` of ``hd / 2``) at
    ``h * hd + 2 * i + j``; Hugging Face at ``h * hd + j * hd / 2 + i`` (transformers'
    ``LlamaTensorProcessor._reverse_permute_weights``, as a row index).
    """
    if rows % (2 * heads):
        raise GGUFBlocksError(f"{rows} rows do not split into {heads} heads of two rope halves")
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


@functools.lru_cache(maxsize=16)
def _index(path: str, mtime_ns: int, size: int) -> GGUFIndex:
    return read_index(path)


def index(path: Path) -> GGUFIndex:
    """The file's metadata and tensor directory (:func:`~meswitch.model.gguf_index.read_index`), cached per
    file, modification time and size."""
    path = Path(path)
    st = path.stat()
    return _index(str(path.resolve()), st.st_mtime_ns, st.st_size)


def _int(idx: GGUFIndex, key: str) -> int | None:
    v = idx.field(key)
    return None if v is None else int(v)


def read_header(path: Path) -> dict[str, int | str | None]:
    """What a GGUF file declares, from its metadata alone: ``arch`` (``general.architecture``), ``hidden``
    (embedding length), ``layers`` (block count), ``vocab`` (rows of ``token_embd``); None where missing."""
    idx = index(path)
    arch = idx.field("general.architecture")
    embd = idx.tensors.get("token_embd.weight")
    return {"arch": None if arch is None else str(arch), "hidden": _int(idx, f"{arch}.embedding_length"),
            "layers": _int(idx, f"{arch}.block_count"),
            "vocab": embd.shape[1] if embd is not None and len(embd.shape) == 2 else None}


def read_blocks(path: Path, names: Iterable[str] | None = None) -> dict[str, BlockTensor]:
    """Every linear weight of the GGUF file at ``path`` (and the token embedding) as raw blocks, keyed by
    Hugging Face parameter name; ``names``: only those. A tied head (no ``output.weight``) appears twice,
    as ``model.embed_tokens.weight`` and ``lm_head.weight``, one :class:`BlockTensor` each over the same bytes.

    Each tensor is copied out of the file (q and k reordered, :func:`rope_row_order`).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    idx = index(path)
    arch = idx.field("general.architecture")
    heads = _int(idx, f"{arch}.attention.head_count")
    kv_heads = _int(idx, f"{arch}.attention.head_count_kv") or heads
    wanted = None if names is None else set(names)
    tie = "output.weight" not in idx.tensors and "token_embd.weight" in idx.tensors
    raw = np.memmap(path, dtype=np.uint8, mode="r")  # every tensor's range was bounds-checked by the index
    out: dict[str, BlockTensor] = {}
    for t in idx.tensors.values():
        name = hf_name(t.name)
        aliases = [n for n in (name, "lm_head.weight" if tie and t.name == "token_embd.weight" else None)
                   if n is not None and (wanted is None or n in wanted)]
        if not aliases:
            continue
        if len(t.shape) != 2:
            raise GGUFBlocksError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected [in, out]")
        n_in, n_out = t.shape  # GGUF lists the fastest dimension first
        size, type_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]]
        if n_in % size or t.nbytes != n_out * (n_in // size) * type_bytes:
            raise GGUFBlocksError(f"{path}: tensor {t.name} ({t.type}, {n_out} x {n_in}) holds {t.nbytes} bytes, "
                                  f"expected {n_out * (n_in // size) * type_bytes}")
        blocks = torch.from_numpy(np.array(raw[t.offset : t.offset + t.nbytes]).reshape(n_out, -1))
        if arch in ROPE_PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            if heads is None:
                raise GGUFBlocksError(f"{path}: no {arch}.attention.head_count to undo the rope order of {t.name}")
            blocks = blocks[rope_row_order(n_out, int(heads if ".attn_q." in t.name else kv_heads))].contiguous()
        first = BlockTensor(aliases[0], t.name, t.type, (n_out, n_in), blocks)
        for alias in aliases:
            out[alias] = replace(first, name=alias)
    return out


def dequantize(t: BlockTensor) -> Tensor:
    """``float32 [out, in]``: the weight ``t`` stores, by gguf-py's dequantizer (any ggml type;
    what transformers' GGUF loader computes, rows in the same order)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    w = gguf_dequantize(t.blocks.numpy(), GGMLQuantizationType[t.type])
    return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).view(t.shape)


def served_bytes(checkpoint: Path, gguf: Path) -> dict[str, int]:
    """What a base checkpoint directory takes in memory as loaded (``dense``) and served from ``gguf``'s
    blocks (``served``): a weight the file holds under the same Hugging Face name and shape, in a type
    with a kernel (:data:`KERNEL_TYPES`), counts at its blocks' bytes; every other tensor at its own.
    From names and shapes only (:func:`~meswitch.model.layout.read_layout` and the GGUF directory): whether
    the values are the file's, the engine checks when it starts (:mod:`meswitch.engine.base_blocks`)."""
    from meswitch.model.convert import DTYPE_BYTES
    from meswitch.model.layout import read_layout

    idx = index(gguf)
    blocks = {}
    for t in idx.tensors.values():
        name = hf_name(t.name)
        if name is not None and t.type in KERNEL_TYPES and len(t.shape) == 2:
            blocks[name] = ((t.shape[1], t.shape[0]), t.nbytes)
    dense = served = 0
    for key, info in read_layout(Path(checkpoint)).tensors.items():
        nbytes = math.prod(info.shape) * DTYPE_BYTES[info.dtype]
        held = blocks.get(key)
        dense += nbytes
        served += held[1] if held is not None and held[0] == info.shape else nbytes
    return {"dense": dense, "served": served}
