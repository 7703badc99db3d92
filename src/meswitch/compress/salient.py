"""ME-Switch salient-channel selection and mixed-precision quantization of a delta.

Shapes: ``delta: [out, in]``, ``act_sq: [in]`` = mean over calibration tokens of ``x_i**2`` (the
per-input-channel second moment, collected elsewhere). The k input channels with the largest
activation-weighted quantization error ``E_i = act_sq_i * sum_j (delta_ji - deq_ji)**2`` are kept
exactly (float16); the other ``in - k`` columns are quantized on a grid computed without them, so
outliers no longer stretch it.

Note: with absmax or min/max grids (2-4 bits, or asymmetric 1 bit), a row's outlier is itself a
grid end point and is reproduced almost exactly, so E_i charges little error to an outlier column;
the damage it does (a coarser grid for the rest of its row) shows up in the other columns' E_i.
Such a column is selected when its act_sq is large, or at symmetric 1 bit (levels +-mean|row|).
"""

from __future__ import annotations

import torch
from torch import Tensor

from meswitch.compress.quant import check_delta, rtn
from meswitch.deltas import QuantizedDelta, check_bits, packed_cols

_FP16_BITS = 16
_INDEX_BITS = 16  # one uint16 index per salient column (in_features <= 65536)


def _check_act_sq(act_sq: Tensor, n: int) -> None:
    if act_sq.shape != (n,):
        raise ValueError(f"act_sq must be [in]=[{n}], got shape {tuple(act_sq.shape)}")


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, in={n}], got {k!r}")


def channel_error(delta: Tensor, deq: Tensor, act_sq: Tensor) -> Tensor:
    """``E_i = act_sq_i * sum_j (delta_ji - deq_ji)**2``: ``delta, deq: [out, in]``, ``act_sq: [in]`` -> ``[in]``.

    Up to a constant, E_i is the expected output error of input channel i (cross terms between
    channels ignored), computed in float32.
    """
    check_delta(delta)
    if deq.shape != delta.shape:
        raise ValueError(f"deq must match delta {tuple(delta.shape)}, got shape {tuple(deq.shape)}")
    _check_act_sq(act_sq, delta.shape[1])
    return act_sq.float() * (delta.float() - deq.float()).square().sum(0)


def select_salient(
    delta: Tensor, act_sq: Tensor, bits: int, k: int, symmetric: bool = True, clip_ratio: float = 1.0
) -> Tensor:
    """Top-k input channels by :func:`channel_error` after round-to-nearest: -> ``int64 [k]``, ascending."""
    check_delta(delta)
    _check_act_sq(act_sq, delta.shape[1])
    _check_k(k, delta.shape[1])
    err = channel_error(delta, rtn(delta, bits, symmetric, clip_ratio).dequantize(), act_sq)
    return torch.topk(err, k).indices.sort().values


def salient_quantize(
    delta: Tensor, act_sq: Tensor, bits: int, k: int, symmetric: bool = True, clip_ratio: float = 1.0
) -> QuantizedDelta:
    """Keep the k salient columns of ``delta: [out, in]`` in float16 and quantize the rest at ``bits``.

    The grid is recomputed on the remaining ``in - k`` columns. ``k = 0`` is exactly :func:`rtn`;
    ``k = in`` stores everything in float16 (codes ``[out, 0]``).
    """
    idx = select_salient(delta, act_sq, bits, k, symmetric, clip_ratio)
    keep = torch.ones(delta.shape[1], dtype=torch.bool, device=delta.device)
    keep[idx] = False
    cols = delta[:, idx].to(torch.float16)
    if not bool(torch.isfinite(cols).all()):
        raise ValueError("salient delta columns exceed the float16 range")
    q = rtn(delta[:, keep], bits, symmetric, clip_ratio)
    return QuantizedDelta(q.codes, q.scale, q.zero, bits, salient_idx=idx, salient_cols=cols, method="salient")


def effective_bits(*, out_features: int, in_features: int, k: int, bits: int, symmetric: bool) -> float:
    """Stored bits per weight of a salient :class:`~meswitch.deltas.QuantizedDelta` = total stored bits / (out * in).

    ``total = out * 8 * packed_cols(in - k, bits)``  (codes, whole bytes per row)
    ``+ 16 * out``  (float16 scale per row) ``+ (0 if symmetric else 16 * out)``  (float16 zero)
    ``+ 16 * out * k``  (float16 salient columns) ``+ 16 * k``  (uint16 index per salient column).
    """
    check_bits(bits)
    if out_features < 1 or in_features < 1:
        raise ValueError(f"out_features and in_features must be >= 1, got {out_features}, {in_features}")
    _check_k(k, in_features)
    grid_rows = 1 if symmetric else 2
    total = (
        out_features * 8 * packed_cols(in_features - k, bits)
        + _FP16_BITS * out_features * grid_rows
        + _FP16_BITS * out_features * k
        + _INDEX_BITS * k
    )
    return total / (out_features * in_features)


def budget_k(*, out_features: int, in_features: int, bits: int, target_bits: float, symmetric: bool) -> int:
    """Largest k in ``[0, in]`` with ``effective_bits(...) <= target_bits``; 0 if even k = 0 exceeds it.

    Each extra salient column adds ``16 * (out + 1)`` bits and saves at most ``8 * out`` bits of
    codes, so effective bits strictly increase with k and a bisection finds the boundary.
    """

    def cost(k: int) -> float:
        return effective_bits(
            out_features=out_features, in_features=in_features, k=k, bits=bits, symmetric=symmetric
        )

    if cost(0) > target_bits:
        return 0
    lo, hi = 0, in_features  # invariant: cost(lo) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= target_bits:
            lo = mid
        else:
            hi = mid - 1
    return lo
