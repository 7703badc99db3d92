"""A CPU kernel for ``x @ W^T`` with ``W`` in ggml's Q4_1 or Q8_0 blocks, as a GGUF file stores it.

``blocks: uint8 [out, in / 32 * block_bytes]``: each output row a run of blocks of 32 input columns
(:mod:`meswitch.model.gguf_blocks` reads them from a GGUF file, rows in Hugging Face order)::

    Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes q   w[j] = d * (q[j] & 15) + m, w[16 + j] = d * (q[j] >> 4) + m
    Q8_0 (34 bytes): fp16 d, 32 int8 q            w[j] = d * q[j]

    linear(x, blocks, type, out) == x @ dequantize(blocks, type, out).T       # x: float32 [B, in] -> [B, out]

up to the order of the float32 sums: the weights are dequantized exactly in registers and multiplied
with ``x`` in float32 (the activations are not quantized, unlike llama.cpp's dot products), so a
model served from these blocks computes what Hugging Face computes on the dequantized checkpoint.
The weight is read at its stored size (Q4_1: 5 bits a weight, a sixth of float32), and with more than
a few rows of ``x`` each block is dequantized once into an L1 buffer that every row then reads.

The C++ source (``csrc/ggml_cpu.cpp``) is compiled on first use by
:func:`torch.utils.cpp_extension.load` (about 30 s, then cached under the meswitch cache), for the
best of :data:`ISAS` this machine runs: AVX2 + FMA + F16C, else a portable loop. Without a compiler
:func:`linear` computes :func:`reference_linear`, the plain PyTorch statement of the same product.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
from torch import Tensor

from meswitch.engine.kernels.cpu_build import compile_kernel, cpu_flags

QK = 32  # elements per block
TYPES = {"Q4_1": (0, 20), "Q8_0": (1, 34)}  # ggml type -> (the kernel's code, bytes per block)
DIRECT_ROWS = 4  # batches of at most this many rows dequantize into registers; larger ones through L1
_SOURCE = Path(__file__).parent / "csrc" / "ggml_cpu.cpp"
# One build per instruction set, best first: (CPU flags it needs, compiler flags). "portable" runs anywhere.
ISAS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-mavx2", "-mfma", "-mf16c"]),
    "portable": (frozenset(), []),
}


def supported_isas() -> list[str]:
    """The builds of :data:`ISAS` this CPU runs, best first."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    return [name for name, (need, _) in ISAS.items() if not need or (x86 and need <= cpu_flags())]


@functools.cache
def _build(isa: str) -> tuple[object | None, str | None]:
    """The kernel compiled for ``isa``, or None and why not."""
    if isa not in ISAS:
        return None, f"{isa!r} is not one of {list(ISAS)}"
    if isa not in supported_isas():
        return None, f"this CPU ({platform.machine()}) lacks {' + '.join(sorted(ISAS[isa][0]))}"
    return compile_kernel(f"meswitch_ggml_cpu_{isa}", f"ggml_cpu-{isa}", _SOURCE, ISAS[isa][1],
                          f"GGML CPU kernel ({isa})")


@functools.cache
def choose(want: str = "") -> tuple[str | None, str | None]:
    """The build to use: (ISA, None), or (None, why there is none); builds on first call.
    ``want``: an ISA of :data:`ISAS`, or ``""`` for the best this CPU has. Call once, at start-up."""
    if want:
        return (want, None) if _build(want)[0] is not None else (None, _build(want)[1])
    reasons = []
    for isa in supported_isas():
        mod, why = _build(isa)
        if mod is not None:
            return isa, None
        reasons.append(f"{isa}: {why}")
    return None, "; ".join(reasons)


def available(want: str = "") -> bool:
    """Whether :func:`choose` finds a build that runs here."""
    return choose(want)[0] is not None


def unavailable_reason(want: str = "") -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return choose(want)[1]


def _check(x: Tensor, blocks: Tensor, type: str, out_features: int) -> int:
    """The input features ``in`` of ``blocks``; ValueError naming what does not fit."""
    if type not in TYPES:
        raise ValueError(f"no kernel for ggml type {type!r}: only {sorted(TYPES)} (dequantize the others)")
    bb = TYPES[type][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != out_features:
        raise ValueError(f"blocks must be uint8 [{out_features}, in / {QK} * {bb}], got {blocks.dtype} "
                         f"{list(blocks.shape)}")
    if blocks.shape[1] % bb:
        raise ValueError(f"{type} rows of {blocks.shape[1]} bytes are not whole blocks of {bb} bytes")
    n_in = blocks.shape[1] // bb * QK
    if x.dim() != 2 or x.shape[1] != n_in:
        if x.dim() == 2 and x.shape[1] % QK:
            raise ValueError(f"x has {x.shape[1]} input features, not a multiple of {QK}: no {type} weight has that")
        raise ValueError(f"x must be [B, {n_in}] for these {type} blocks ({out_features} x {n_in}), "
                         f"got {list(x.shape)}")
    return n_in


def linear(x: Tensor, blocks: Tensor, type: str, out_features: int, isa: str | None = None,
           mode: str = "auto") -> Tensor:
    """``x: float32 [B, in]``, ``blocks: uint8 [out, in / 32 * block_bytes]`` of ggml ``type`` (``"Q4_1"``,
    ``"Q8_0"``) -> ``y: float32 [B, out] = x @ dequantize(blocks, type, out).T`` (module docstring).

    ``isa``: a build of :data:`ISAS`, ``"reference"`` (:func:`reference_linear`) or None (the best build
    here; :func:`reference_linear` when none builds). ``mode``: ``"direct"`` or ``"buffered"`` forces one
    way through the kernel (tests, benchmarks); ``"auto"`` picks by batch (:data:`DIRECT_ROWS`).
    ValueError when the shapes do not fit (``in`` not a multiple of 32, blocks not ``[out, ...]``).
    """
    _check(x, blocks, type, out_features)
    if isa == "reference":
        return reference_linear(x, blocks, type, out_features)
    chosen, why = choose(isa or "")
    if chosen is None:
        if isa:
            raise RuntimeError(f"the GGML CPU kernel ({isa}) is unavailable: {why}")
        return reference_linear(x, blocks, type, out_features)
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.float().contiguous()
    modes = {"auto": 0, "direct": 1, "buffered": 2}
    if mode not in modes:
        raise ValueError(f"mode must be one of {list(modes)}, got {mode!r}")
    return _build(chosen)[0].linear(x, blocks.contiguous(), TYPES[type][0], modes[mode], DIRECT_ROWS)


def dequantize(blocks: Tensor, type: str, out_features: int, isa: str | None = None) -> Tensor:
    """``uint8 [out, in / 32 * block_bytes]`` -> ``float32 [out, in]``: the weight the blocks state (module
    docstring), exactly as gguf-py's dequantizer computes it. By the compiled kernel (parallel over rows)
    where one builds, else :func:`reference_dequantize`; ``isa`` as in :func:`linear`."""
    if type not in TYPES:
        raise ValueError(f"no kernel for ggml type {type!r}: only {sorted(TYPES)}")
    if isa == "reference":
        return reference_dequantize(blocks, type, out_features)
    chosen, why = choose(isa or "")
    if chosen is None:
        if isa:
            raise RuntimeError(f"the GGML CPU kernel ({isa}) is unavailable: {why}")
        return reference_dequantize(blocks, type, out_features)
    bb = TYPES[type][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != out_features or blocks.shape[1] % bb:
        raise ValueError(f"blocks must be uint8 [{out_features}, whole {bb}-byte blocks], got {blocks.dtype} "
                         f"{list(blocks.shape)}")
    return _build(chosen)[0].dequantize(blocks.contiguous(), TYPES[type][0])


def reference_dequantize(blocks: Tensor, type: str, out_features: int) -> Tensor:
    """What :func:`dequantize` computes, in plain PyTorch."""
    if type not in TYPES:
        raise ValueError(f"no kernel for ggml type {type!r}: only {sorted(TYPES)}")
    bb = TYPES[type][1]
    b = blocks.reshape(out_features, -1, bb)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [out, nb, 1]
    if type == "Q4_1":
        m = b[..., 2:4].contiguous().view(torch.float16).float()
        q = b[..., 4:]
        q = torch.cat([q & 15, q >> 4], -1).float()  # low nibbles: elements 0..15, high: 16..31
        w = d * q + m
    else:
        w = d * b[..., 2:].contiguous().view(torch.int8).float()
    return w.reshape(out_features, -1)


def reference_linear(x: Tensor, blocks: Tensor, type: str, out_features: int) -> Tensor:
    """What :func:`linear` computes, in plain PyTorch: ``x @ dequantize(blocks, type, out).T``, float32 ``[B, out]``."""
    _check(x, blocks, type, out_features)
    return x.float() @ reference_dequantize(blocks, type, out_features).T
