"""Per-output-channel quantization of a delta matrix, as a chain: qparams -> quantize -> dequantize.

Shapes: ``delta: [out, in]`` (any float dtype; the math is float32), one grid per output row, so
``scale: [out]`` and ``zero: [out]`` (or ``None`` for the symmetric grid). ``L = 2**bits`` levels.

Grids (``c`` is the uint8 code in ``[0, L)``):

* symmetric (``zero is None``): ``level(c) = (c - (L - 1) / 2) * scale``, a zero-free grid centred
  on 0. At 1 bit the levels are ``+-scale/2``, and the default ``scale = 2 * mean|row|`` makes
  1-bit symmetric exactly ``sign(delta) * mean|row|`` (BitDelta per row; ``sign(0) := +1``).
  At 2-4 bits the default outermost level sits at the row's absmax: ``scale = 2*absmax/(L-1)``.
* asymmetric: ``level(c) = zero + c * scale`` with ``zero = min(row)`` and
  ``scale = (max(row) - zero) / (L - 1)``.

Quantization picks the nearest level (ties toward the larger level) and clamps to the grid.
``clip_ratio`` (default 1.0) shrinks the grid's reference magnitude (absmax, mean|row| at 1 bit, or
min/max) by that factor. There is deliberately no MSE clipping search: it lowered weight error but
was measured to hurt model outputs.

Scales and zeros are float32 tensors holding float16-representable values (what a store keeps);
scales are rounded up and zeros down, so a grid still covers its row, and scales are floored at
the smallest float16 (2**-24) so all-zero rows give no NaN/inf. ``dequantize`` is differentiable in
``scale`` and ``zero``, so step sizes can be tuned by gradient with the codes frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from meswitch.compress.pack import check_bits

SCALE_FLOOR = 2.0**-24  # smallest positive float16


class QuantParams(NamedTuple):
    """Grid of each output row: ``scale: [out]``, ``zero: [out]`` or ``None`` (symmetric)."""

    scale: Tensor
    zero: Tensor | None


@dataclass(frozen=True, eq=False)
class QuantizedDelta:
    """Codes and grid of a delta: ``codes: uint8 [out, in]``, ``scale: [out]``, ``zero: [out] | None``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])

    def dequantize(self) -> Tensor:
        """``[out, in]`` float32 reconstruction; differentiable in ``scale`` and ``zero``."""
        return dequantize(self.codes, self.scale, self.zero, self.bits)


def check_delta(delta: Tensor, name: str = "delta") -> Tensor:
    """Raise unless ``delta`` is a finite floating 2-D ``[out, in]`` tensor; return it."""
    if delta.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{name} {tuple(delta.shape)} contains NaN or inf")
    return delta


def _check_grid(scale: Tensor, zero: Tensor | None, out: int) -> None:
    if scale.shape not in ((out,), (1,)):
        raise ValueError(f"scale must be [out]=[{out}] (or [1]), got shape {tuple(scale.shape)}")
    if zero is not None and zero.shape != scale.shape:
        raise ValueError(f"zero must match scale {tuple(scale.shape)}, got shape {tuple(zero.shape)}")


def _to_f16(x: Tensor, up: bool) -> Tensor:
    """Round float32 ``x`` to a float16-representable float32, toward +inf (``up``) or -inf."""
    h = x.to(torch.float16)
    off = h.float() < x if up else h.float() > x
    toward = torch.full_like(h, float("inf") if up else float("-inf"))
    out = torch.where(off, torch.nextafter(h, toward), h).float()
    if not bool(torch.isfinite(out).all()):
        raise ValueError("delta magnitude exceeds the float16 range of scales and zeros")
    return out


def qparams(delta: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0) -> QuantParams:
    """Default grid per output row of ``delta: [out, in]`` -> ``scale: [out]``, ``zero: [out] | None``.

    Symmetric: ``scale = 2 * clip_ratio * m / (L - 1)`` with ``m = mean|row|`` at 1 bit and
    ``m = absmax(row)`` at 2-4 bits. Asymmetric: ``zero = clip_ratio * min(row)``,
    ``scale = (clip_ratio * max(row) - zero) / (L - 1)``. See the module docstring for rounding.
    """
    check_bits(bits)
    if not clip_ratio > 0:
        raise ValueError(f"clip_ratio must be > 0, got {clip_ratio}")
    d = check_delta(delta).detach().float()
    out, n, levels = d.shape[0], d.shape[1], 1 << bits
    if n == 0:  # no columns (e.g. every channel kept salient): a valid, unused grid
        floor = torch.full((out,), SCALE_FLOOR, device=d.device)
        return QuantParams(floor, None if symmetric else torch.zeros(out, device=d.device))
    if symmetric:
        mag = d.abs().mean(1) if bits == 1 else d.abs().amax(1)
        scale = 2 * clip_ratio * mag / (levels - 1)
        return QuantParams(_to_f16(scale.clamp_min(SCALE_FLOOR), up=True), None)
    zero = _to_f16(clip_ratio * d.amin(1), up=False)
    scale = (clip_ratio * d.amax(1) - zero) / (levels - 1)
    return QuantParams(_to_f16(scale.clamp_min(SCALE_FLOOR), up=True), zero)


def quantize(delta: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Codes of the nearest grid level: ``delta: [out, in]``, ``scale/zero: [out]`` -> ``uint8 [out, in]``.

    Symmetric: ``clamp(floor(delta / scale + L/2), 0, L-1)``; asymmetric:
    ``clamp(floor((delta - zero) / scale + 1/2), 0, L-1)``. Not differentiable (codes are integers).
    """
    check_bits(bits)
    d = check_delta(delta).detach().float()
    _check_grid(scale, zero, d.shape[0])
    levels = 1 << bits
    s = scale.detach().float()[:, None]
    # floor(position + 1/2) rounds to the nearest level, half up; symmetric position is d/s + (L-1)/2
    pos = d / s + (levels - 1) / 2 if zero is None else (d - zero.detach().float()[:, None]) / s
    return (pos + 0.5).floor_().clamp_(0, levels - 1).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor | None, bits: int) -> Tensor:
    """Grid levels of ``codes: uint8 [out, in]`` -> ``[out, in]``; differentiable in ``scale``/``zero``.

    Computed in ``promote(scale.dtype, float32)`` (float32 for float16 scales, float64 for float64).
    ``scale``/``zero`` may also be ``[1]``: one grid for the whole matrix (see :func:`bitdelta`).
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8, got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    _check_grid(scale, zero, codes.shape[0])
    dtype = torch.promote_types(scale.dtype, torch.float32)
    c = codes.to(dtype)
    s = scale.to(dtype)[:, None]
    if zero is None:
        return (c - ((1 << bits) - 1) / 2) * s
    return c * s + zero.to(dtype)[:, None]


def rtn(delta: Tensor, bits: int, symmetric: bool = True, clip_ratio: float = 1.0) -> QuantizedDelta:
    """Round-to-nearest with the default grid: ``delta: [out, in]`` -> codes ``[out, in]`` + grid ``[out]``."""
    scale, zero = qparams(delta, bits, symmetric, clip_ratio)
    return QuantizedDelta(quantize(delta, scale, zero, bits), scale, zero, bits)


def bitdelta(delta: Tensor) -> tuple[Tensor, Tensor]:
    """BitDelta: ``delta: [out, in]`` -> (``codes: uint8 [out, in]``, ``scale: [1]``), one scale per matrix.

    ``codes = (delta >= 0)`` (1 bit) and ``scale = 2 * mean|delta|``, on the symmetric 1-bit grid,
    so ``dequantize(codes, scale, None, 1) == sign(delta) * mean|delta|`` (``sign(0) := +1``).
    Note: BitDelta's ``alpha`` (its initial value mean|delta|) is ``scale / 2`` here.
    """
    d = check_delta(delta).detach().float()
    mean_abs = d.abs().mean().reshape(1) if d.numel() else torch.zeros(1, device=d.device)
    scale = _to_f16((2 * mean_abs).clamp_min(SCALE_FLOOR), up=True)
    return quantize(d, scale, None, 1), scale


def sign2d(delta: Tensor, act_sq: Tensor | None = None, iters: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """1-bit delta with a scale per output row *and* per input column.

    ``delta: [out, in]`` -> (``codes: uint8 [out, in]`` = ``delta >= 0``, ``row: [out]``, ``col: [in]``)
    with ``delta ~= sign(delta) * row[:, None] * col[None, :]``. ``row`` and ``col`` are the
    non-negative rank-1 fit of ``|delta|`` minimising ``sum_i act_sq_i * sum_j (|delta_ji| - row_j col_i)^2``
    (alternating least squares; ``act_sq`` weighs the input channels the calibration text uses most).
    Both scales are rounded to float16-representable values.
    """
    d = check_delta(delta).detach().float()
    a = d.abs()
    w = torch.ones(d.shape[1], device=d.device) if act_sq is None else act_sq.detach().float().clamp_min(1e-12)
    col = a.mean(0).clamp_min(SCALE_FLOOR)
    row = a.mean(1).clamp_min(SCALE_FLOOR)
    for _ in range(iters):
        row = ((a * (w * col)).sum(1) / (w * col.square()).sum().clamp_min(1e-30)).clamp_min(SCALE_FLOOR)
        col = ((a * row[:, None]).sum(0) / row.square().sum().clamp_min(1e-30)).clamp_min(SCALE_FLOOR)
    # balance the two factors so neither under- or overflows float16
    g = (row.amax() / col.amax()).sqrt()
    row, col = row / g, col * g
    codes = (d >= 0).to(torch.uint8)
    return codes, _to_f16(row, up=True), _to_f16(col, up=True)


def sign2d_dequantize(codes: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """``(2 * codes - 1) * row[:, None] * col[None, :]``: ``[out, in]``; differentiable in ``row``/``col``."""
    dtype = torch.promote_types(row.dtype, torch.float32)
    return (codes.to(dtype) * 2 - 1) * row.to(dtype)[:, None] * col.to(dtype)[None, :]
