"""Codes chosen with error feedback (GPTQ, Frantar et al. 2023) for a delta on a per-row grid.

Round-to-nearest picks each code on its own. GPTQ quantizes the input columns one at a time and
moves each column's rounding error onto the columns not yet quantized, weighted by the inverse of
the layer's input second-moment matrix ``H = E[x x^T]`` from calibration text, so the *output*
error ``E[|(delta - deq) x|^2] = tr((delta - deq) H (delta - deq)^T)`` is what gets minimised,
not the weight error. The grid and the store layout are exactly round-to-nearest's (``rtn`` in
:mod:`meswitch.compress.codec`): only which code each weight gets changes, so decoding, the
engine and the store need nothing new.

Shapes: ``delta: [out, in]``, ``hessian: [in, in]`` (symmetric, positive semi-definite),
``scale: [out]``, ``codes: uint8 [out, in]``. The math is float32 (float64 for the Cholesky
factors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from meswitch.compress.quant import SCALE_FLOOR, _to_f16, check_delta, qparams
from meswitch.deltas import QuantizedDelta

DAMP = 0.01  # fraction of the mean diagonal added to H before inverting (GPTQ's default)
BLOCK = 128  # columns per lazy-update block


def inverse_hessian_factor(hessian: Tensor, damp: float = DAMP) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1``: ``[in, in]`` float32.

    Channels no calibration token used (``H_ii = 0``) get ``H_ii = 1``: their columns are rounded
    to nearest and pass no error on.
    """
    h = hessian.detach().double().clone()
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be square [in, in], got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian contains NaN or inf")
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    diag += damp * diag.mean()
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()


def gptq_codes(delta: Tensor, hessian: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
               damp: float = DAMP, block: int = BLOCK) -> Tensor:
    """Codes on the fixed grid ``(scale, zero)`` chosen column by column with error feedback.

    delta: ``[out, in]``; hessian: ``[in, in]``; scale/zero: ``[out]`` -> ``uint8 [out, in]``.
    Columns go in their natural order: GPTQ's "act order" (largest ``H_ii`` first) was measured
    to raise the math expert's KL by 30% at 1.5 bits.
    """
    w = check_delta(delta).detach().float().clone()
    out, n = w.shape
    if hessian.shape != (n, n):
        raise ValueError(f"hessian must be [{n}, {n}] for a delta of {list(w.shape)}, got {list(hessian.shape)}")
    u = inverse_hessian_factor(hessian, damp).to(w.device)
    codes = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    # quantize()/dequantize() inlined (same operations, so the same codes) to keep the column loop lean
    levels = 1 << bits
    mid = (levels - 1) / 2
    s = scale.detach().float().expand(out)
    z = None if zero is None else zero.detach().float().expand(out)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2]  # a view: updates land in w
        err = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            pos = col / s + mid if z is None else (col - z) / s
            c = (pos + 0.5).floor_().clamp_(0, levels - 1)
            codes[:, i1 + i] = c.to(torch.uint8)
            q = (c - mid) * s if z is None else c * s + z
            e = (col - q) / u1[i, i]
            w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes


def refit_scale(delta: Tensor, hessian: Tensor, codes: Tensor, bits: int) -> Tensor:
    """Per-row symmetric scale minimising ``tr(E H E^T)`` for fixed codes: ``[out]`` float32.

    With ``levels = codes - (L - 1) / 2`` the optimum is ``(delta H levels^T)_jj / (levels H levels^T)_jj``.
    """
    lv = codes.float() - ((1 << bits) - 1) / 2
    h = hessian.float()
    num = ((delta.float() @ h) * lv).sum(1)
    den = ((lv @ h) * lv).sum(1).clamp_min(1e-30)
    return (num / den).clamp_min(0)


def gptq(delta: Tensor, hessian: Tensor, bits: int, clip_ratio: float | None = None, refits: int | None = None,
         damp: float = DAMP) -> QuantizedDelta:
    """GPTQ on the symmetric per-row grid: ``delta: [out, in]``, ``hessian: [in, in]`` -> codes + scale.

    The grid starts from :func:`~meswitch.compress.quant.qparams` (``clip_ratio``: default 1.0 at
    1 bit, where the levels are ``+-mean|row|``, and 0.85 x absmax above). ``refits`` rounds of
    (refit the scales to the codes, choose the codes again) follow; default 2 at 1 bit, 0 above.
    Measured on the reference zoo (docs/compression.md): these defaults; more refits or clipping
    changed the outputs little.
    """
    clip = clip_ratio if clip_ratio is not None else (1.0 if bits == 1 else 0.85)
    rounds = refits if refits is not None else (2 if bits == 1 else 0)
    scale, _ = qparams(delta, bits, True, clip)
    codes = gptq_codes(delta, hessian, scale, None, bits, damp)
    for _ in range(rounds):
        fit = refit_scale(delta, hessian, codes, bits)
        scale = torch.where(fit > 0, _to_f16(fit.clamp_min(SCALE_FLOOR), up=True), scale)
        codes = gptq_codes(delta, hessian, scale, None, bits, damp)
    return QuantizedDelta(codes, scale, None, bits)


def row_output_error(delta: Tensor, deq: Tensor, hessian: Tensor) -> Tensor:
    """``(E H E^T)_jj`` per output row ``j``, ``E = delta - deq``: ``[out]``."""
    e = delta.float() - deq.float()
    return ((e @ hessian.float()) * e).sum(1)


def output_error(delta: Tensor, deq: Tensor, hessian: Tensor) -> float:
    """``tr((delta - deq) H (delta - deq)^T)``: expected squared output error per token."""
    return float(row_output_error(delta, deq, hessian).sum())
