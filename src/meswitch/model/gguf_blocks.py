"""A GGUF file's linear weights as the raw ggml blocks it stores, under their Hugging Face names.

Shapes: ``out``/``in`` a linear layer's features (Hugging Face ``[out, in]``), ``QK`` = 32 elements
per block (Q4_1, Q8_0), ``row_bytes = in / QK * block_bytes``. A ggml quantized row runs along the
input dimension and each output row is its own run of blocks, so a weight is ``uint8 [out, row_bytes]``
and reordering output rows is reordering rows of bytes. What each block means::

    Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes q   w[j] = d * (q[j] & 15) + m, w[16 + j] = d * (q[j] >> 4) + m
    Q8_0 (34 bytes): fp16 d, 32 int8 q            w[j] = d * q[j]

(:func:`meswitch.engine.kernels.ggml_cpu.dequantize` states them in PyTorch; the kernels there read them.)

llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` of a ``llama`` model for its
rope layout (within each head, the two rotated halves interleaved); :func:`read_blocks` undoes it
as transformers' GGUF loader does, so row ``o`` of a tensor here is output ``o`` of the Hugging Face
module. Types other than :data:`KERNEL_TYPES` (the K-quants, Q5_0, F16, ...) are read all the same,
with :attr:`BlockTensor.has_kernel` False: the caller dequantizes those (:func:`dequantize`) and says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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


def _field(reader: object, key: str) -> int | str | None:
    field = reader.fields.get(key)  # type: ignore[attr-defined]
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else int(value[0])


def read_blocks(path: Path, names: Iterable[str] | None = None) -> dict[str, BlockTensor]:
    """Every linear weight of the GGUF file at ``path`` (and the token embedding) as raw blocks, keyed by
    Hugging Face parameter name; ``names``: only those. A tied head (no ``output.weight``) appears twice,
    as ``model.embed_tokens.weight`` and ``lm_head.weight``, one :class:`BlockTensor` each over the same bytes.

    Each tensor is copied out of the file (q and k reordered, :func:`rope_row_order`).
    """
    import gguf

    path = Path(path)
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    wanted = None if names is None else set(names)
    found = {t.name for t in reader.tensors}
    tie = "output.weight" not in found and "token_embd.weight" in found
    out: dict[str, BlockTensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        aliases = [n for n in (name, "lm_head.weight" if tie and t.name == "token_embd.weight" else None)
                   if n is not None and (wanted is None or n in wanted)]
        if not aliases:
            continue
        if len(t.shape) != 2:
            raise GGUFBlocksError(f"{path}: tensor {t.name} has shape {list(t.shape)}, expected [in, out]")
        n_in, n_out = (int(s) for s in t.shape)  # GGUF lists the fastest dimension first
        blocks = torch.from_numpy(np.ascontiguousarray(t.data).view(np.uint8).reshape(n_out, -1).copy())
        size, type_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        if n_in % size or blocks.shape[1] != n_in // size * type_bytes:
            raise GGUFBlocksError(f"{path}: tensor {t.name} ({t.tensor_type.name}, {n_out} x {n_in}) holds "
                                  f"{blocks.shape[1]} bytes a row, expected {n_in // size * type_bytes}")
        if arch in ROPE_PERMUTED and (".attn_q." in t.name or ".attn_k." in t.name):
            if heads is None:
                raise GGUFBlocksError(f"{path}: no {arch}.attention.head_count to undo the rope order of {t.name}")
            blocks = blocks[rope_row_order(n_out, int(heads if ".attn_q." in t.name else kv_heads))].contiguous()
        first = BlockTensor(aliases[0], t.name, t.tensor_type.name, (n_out, n_in), blocks)
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
