"""Per-output-channel quantization of a delta matrix, as a chain: qparams -> quantize -> (deltas.grid) dequantize.

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

from typing import NamedTuple

import torch
from torch import Tensor

from meswitch.deltas import QuantizedDelta, check_bits
from meswitch.deltas.grid import check_grid

SCALE_FLOOR = 2.0**-24  # smallest positive float16


class QuantParams(NamedTuple):
    """Grid of each output row: ``scale: [out]``, ``zero: [out]`` or ``None`` (symmetric)."""

    scale: Tensor
    zero: Tensor | None


def check_delta(delta: Tensor, name: str = "delta") -> Tensor:
    """Raise unless ``delta`` is a finite floating 2-D ``[out, in]`` tensor; return it."""
    if delta.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{name} {tuple(delta.shape)} contains NaN or inf")
    return delta


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
    check_grid(scale, zero, d.shape[0])
    levels = 1 << bits
    s = scale.detach().float()[:, None]
    # floor(position + 1/2) rounds to the nearest level, half up; symmetric position is d/s + (L-1)/2
    pos = d / s + (levels - 1) / 2 if zero is None else (d - zero.detach().float()[:, None]) / s
    return (pos + 0.5).floor_().clamp_(0, levels - 1).to(torch.uint8)


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
