"""Encode one delta matrix into a :mod:`meswitch.deltas` record, and so into the tensors a store keeps.

Methods: ``salient`` (ME-Switch: ``k`` salient input columns in 16 bit, the rest at ``bits`` on a
per-output-row grid), ``rtn`` (the same with ``k = 0``), ``gptq`` (the ``rtn`` layout with codes
chosen by error feedback, :mod:`meswitch.compress.gptq`; meta ``gptq: True``), ``sign2d`` (1-bit
signs with a scale per output row and per input column, plus ``k`` salient columns), ``bitdelta``
(sign bits and one scale per matrix); ``lowrank`` (the truncated SVD as a
:class:`~meswitch.deltas.LowRankDelta`: 16-bit factors, layer meta ``method: lora`` and ``svd: True``,
:func:`lowrank_delta`). The stored layout of each is documented in :mod:`meswitch.deltas.records`;
decoding lives there too (:func:`meswitch.deltas.decode`).

The size of a layer is the sum of its tensors' bytes: every overhead is counted, nothing estimated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from meswitch.compress.quant import bitdelta, sign2d
from meswitch.compress.salient import channel_error, salient_quantize
from meswitch.deltas import LowRankDelta, QuantizedDelta, sign2d_dequantize
from meswitch.errors import MeswitchError

METHODS = ("salient", "sign2d", "rtn", "bitdelta", "gptq")  # quantized forms (quantize_delta)
LOW_RANK_METHOD = "lowrank"  # the truncated SVD (lowrank_delta)


class LowRankError(MeswitchError, ValueError):
    """A rank that no ``[out, in]`` delta can be truncated to."""


def encode_delta(delta: Tensor, method: str, *args: Any, **kwargs: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(store tensors, layer meta) of ``delta: [out, in]``: :func:`quantize_delta`'s record (same arguments),
    or for ``lowrank`` :func:`lowrank_delta`'s (argument: the rank), stored."""
    if method == LOW_RANK_METHOD:
        low = lowrank_delta(delta, *args, **kwargs)
        return low.fields(), {**low.meta(), "svd": True}
    record = quantize_delta(delta, method, *args, **kwargs)
    meta = record.meta()
    if method == "gptq":
        meta["gptq"] = True
    return record.fields(), meta


def quantize_delta(
    delta: Tensor,
    method: str,
    bits: int,
    k: int = 0,
    act_sq: Tensor | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    hessian: Tensor | None = None,
) -> QuantizedDelta:
    """The record of ``delta: [out, in]`` under ``method`` (module docstring).

    act_sq: ``[in]`` mean squared calibration activation per input channel (salient selection);
    without it every channel weighs the same. hessian: ``[in, in]`` input second moment, required
    by ``gptq`` (which takes its own grid defaults: ``clip_ratio`` and ``symmetric`` do not apply).
    """
    if method == "gptq":
        from meswitch.compress.gptq import gptq

        if hessian is None:
            raise ValueError("method 'gptq' needs the layer's input second-moment matrix (hessian)")
        return gptq(delta.float(), hessian, bits)
    if method == "bitdelta":
        codes, scale = bitdelta(delta)
        return QuantizedDelta(codes, scale, None, 1, method="bitdelta")
    if method == "sign2d":
        return quantize_sign2d(delta, k, act_sq)
    if method == LOW_RANK_METHOD:
        raise ValueError("method 'lowrank' is not a quantized form: encode it with lowrank_delta or encode_delta")
    if method not in ("salient", "rtn"):
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "rtn":
        k = 0
    if act_sq is None:
        act_sq = torch.ones(delta.shape[1])
    sd = salient_quantize(delta.float(), act_sq, bits, k, symmetric, clip_ratio)
    return QuantizedDelta(sd.codes, sd.scale, sd.zero, bits, sd.salient_idx, sd.salient_cols, method=method)


def quantize_sign2d(delta: Tensor, k: int, act_sq: Tensor | None) -> QuantizedDelta:
    """Signs with row and column scales (:func:`~meswitch.compress.quant.sign2d`); the k input
    channels with the largest activation-weighted error of that fit stay in 16 bit."""
    delta = delta.float()
    act = torch.ones(delta.shape[1]) if act_sq is None else act_sq.float()
    idx = torch.zeros(0, dtype=torch.long)
    if k:
        c, r, col = sign2d(delta, act)
        idx = torch.topk(channel_error(delta, sign2d_dequantize(c, r, col), act), k).indices.sort().values
    keep = torch.ones(delta.shape[1], dtype=torch.bool)
    keep[idx] = False
    codes, row, col = sign2d(delta[:, keep], act[keep])
    return QuantizedDelta(codes, row, None, 1, idx, delta[:, idx].to(torch.float16), col, method="sign2d")


def lowrank_delta(delta: Tensor, rank: int) -> LowRankDelta:
    """The best rank-``rank`` approximation of ``delta: [out, in]`` (Eckart-Young), as 16-bit factors.

    With ``delta = U diag(S) V^T`` (singular values descending): ``b = U_r diag(S_r) / S_1: [out, r]``,
    ``a = V_r^T: [r, in]``, ``scale = S_1`` (the largest singular value; 1 for a zero delta), so that
    ``scale * b @ a = U_r diag(S_r) V_r^T``. Dividing by ``S_1`` keeps ``|b| <= 1`` and ``a``'s unit rows
    in fp16's normal range whatever the delta's magnitude. Costs ``16 r (out + in)`` bits.
    """
    if delta.dim() != 2:
        raise LowRankError(f"lowrank: delta must be [out, in], got shape {list(delta.shape)}")
    full = min(delta.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
        raise LowRankError(f"lowrank: rank must be an integer in [1, {full}] for a delta of shape "
                           f"{list(delta.shape)}, got {rank!r}")
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # [out, m], [m], [m, in]; m = min(out, in)
    top = float(s[0])
    scale = top if top > 0 else 1.0
    b = u[:, :rank] * (s[:rank] / scale)
    return LowRankDelta(vh[:rank].to(torch.float16), b.to(torch.float16), scale)


def layer_bits(fields: dict[str, Tensor], meta: dict[str, Any]) -> float:
    """Stored bits per delta parameter of one layer (all fields counted)."""
    numel = 1
    for d in meta["shape"]:
        numel *= int(d)
    return 8 * sum(t.numel() * t.element_size() for t in fields.values()) / numel
