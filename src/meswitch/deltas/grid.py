"""Grid levels of quantized codes: the arithmetic every reader of a stored delta shares.

Shapes: ``codes: uint8 [out, n]`` (values in ``[0, 2**bits)``), one grid per output row
(``scale``/``zero: [out]``, or ``[1]`` for one grid per matrix). ``m = (2**bits - 1) / 2``::

    symmetric  (zero is None):  level(c) = (c - m) * scale
    asymmetric:                 level(c) = c * scale + zero
    sign2d:                     level(c) = (2c - 1) * row[o] * col[i]
"""

from __future__ import annotations

import torch
from torch import Tensor

from meswitch.deltas.pack import check_bits


def check_grid(scale: Tensor, zero: Tensor | None, out: int) -> None:
    """Raise ValueError unless ``scale`` is ``[out]`` or ``[1]`` and ``zero`` (if any) matches it."""
    if scale.shape not in ((out,), (1,)):
        raise ValueError(f"scale must be [out]=[{out}] (or [1]), got shape {tuple(scale.shape)}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero must match scale {tuple(scale.shape)}, got shape {tuple(zero.shape)}")


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Grid levels of ``codes: uint8 [out, in]`` -> ``[out, in]``; differentiable in ``scale``/``zero``.

    Computed in ``promote(scale.dtype, float32)`` (float32 for float16 scales, float64 for float64).
    ``scale``/``zero`` may also be ``[1]``: one grid for the whole matrix (BitDelta).
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    check_grid(scale, zero, codes.shape[0])
    dtype = torch.promote_types(scale.dtype, torch.float32)
    c = codes.to(dtype)
    s = scale.to(dtype)[:, None]
    if zero is None:
        return (c - ((1 << bits) - 1) / 2) * s
    return c * s + zero.to(dtype)[:, None]


def sign2d_dequantize(codes: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """``(2 * codes - 1) * row[:, None] * col[None, :]``: ``[out, in]``; differentiable in ``row``/``col``."""
    dtype = torch.promote_types(row.dtype, torch.float32)
    return (codes.to(dtype) * 2 - 1) * row.to(dtype)[:, None] * col.to(dtype)[None, :]
