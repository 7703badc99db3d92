"""Encode one delta matrix into the tensors a store keeps, and decode them back.

Methods (``meta["method"]``):

- ``salient``: ME-Switch. ``k`` salient input columns in float16, the rest at ``bits`` on a
  per-output-row grid. Fields: ``codes`` uint8 ``[out, packed_cols(in-k, bits)]``, ``scale`` fp16
  ``[out]``, ``zero`` fp16 ``[out]`` (asymmetric only), ``salient_idx`` int16 ``[k]``,
  ``salient_cols`` fp16 ``[out, k]``. ``rtn`` is the same layout with ``k = 0``.
- ``sign2d``: 1-bit signs with a scale per output row and per input column (a rank-1 magnitude),
  plus ``k`` salient fp16 columns as above. Fields: ``codes`` ``[out, packed_cols(in-k, 1)]``,
  ``scale`` fp16 ``[out]``, ``col_scale`` fp16 ``[in-k]``, ``salient_idx``, ``salient_cols``.
- ``bitdelta``: ``codes`` uint8 ``[out, packed_cols(in, 1)]`` (sign bits), ``scale`` fp16 ``[1]``.
- ``dense``: ``delta`` fp16, any shape (norms and other small tensors).

Encoding method ``gptq`` (:mod:`meswitch.compress.gptq`) stores the ``rtn`` layout (symmetric,
``k = 0``) with ``meta["gptq"] = True``: its codes are chosen with error feedback, decoded alike.

The size of a layer is the sum of its tensors' bytes: every overhead is counted, nothing estimated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from meswitch.compress.pack import pack, unpack
from meswitch.compress.quant import bitdelta, dequantize, sign2d, sign2d_dequantize
from meswitch.compress.salient import SalientDelta, channel_error, salient_quantize

METHODS = ("salient", "sign2d", "rtn", "bitdelta", "gptq")


def _salient_fields(in_features: int, idx: Tensor, cols: Tensor) -> dict[str, Tensor]:
    """``salient_idx`` (int16 while in_features allows) and fp16 ``salient_cols: [out, k]``; none when k = 0."""
    if not len(idx):
        return {}
    idx_dtype = torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32
    return {"salient_idx": idx.to(idx_dtype), "salient_cols": cols.to(torch.float16)}


def encode_salient(sd: SalientDelta) -> dict[str, Tensor]:
    """Store tensors of a :class:`SalientDelta` (codes packed, indices int16)."""
    out: dict[str, Tensor] = {
        "codes": pack(sd.codes, sd.bits),
        "scale": sd.scale.detach().to(torch.float16),
    }
    if sd.zero is not None:
        out["zero"] = sd.zero.detach().to(torch.float16)
    return {**out, **_salient_fields(sd.shape[1], sd.salient_idx, sd.salient_cols)}


def decode_salient(fields: dict[str, Tensor], meta: dict[str, Any]) -> SalientDelta:
    """Inverse of :func:`encode_salient`; ``meta`` holds ``bits``, ``shape`` and ``salient`` (k)."""
    out, n = meta["shape"]
    k, bits = int(meta["salient"]), int(meta["bits"])
    idx = fields["salient_idx"].long() if k else torch.zeros(0, dtype=torch.long)
    cols = fields["salient_cols"] if k else torch.zeros(out, 0, dtype=torch.float16)
    return SalientDelta(
        salient_idx=idx,
        salient_cols=cols,
        codes=unpack(fields["codes"], bits, n - k),
        scale=fields["scale"].float(),
        zero=fields["zero"].float() if "zero" in fields else None,
        bits=bits,
        shape=(out, n),
    )


def encode_delta(
    delta: Tensor,
    method: str,
    bits: int,
    k: int = 0,
    act_sq: Tensor | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    hessian: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Compress ``delta: [out, in]`` -> (store tensors, layer meta).

    act_sq: ``[in]`` mean squared calibration activation per input channel (salient selection);
    without it every channel weighs the same. hessian: ``[in, in]`` input second moment, required
    by ``gptq`` (which takes its own grid defaults: ``clip_ratio`` and ``symmetric`` do not apply).
    """
    shape = [int(delta.shape[0]), int(delta.shape[1])]
    if method == "gptq":
        from meswitch.compress.gptq import gptq

        if hessian is None:
            raise ValueError("method 'gptq' needs the layer's input second-moment matrix (hessian)")
        q = gptq(delta.float(), hessian, bits)
        meta = {"method": "rtn", "bits": bits, "shape": shape, "salient": 0, "symmetric": True, "gptq": True}
        return {"codes": pack(q.codes, bits), "scale": q.scale.to(torch.float16)}, meta
    if method == "bitdelta":
        codes, scale = bitdelta(delta)
        meta = {"method": "bitdelta", "bits": 1, "shape": shape, "salient": 0, "symmetric": True}
        return {"codes": pack(codes, 1), "scale": scale.to(torch.float16)}, meta
    if method == "sign2d":
        return encode_sign2d(delta, k, act_sq), {
            "method": "sign2d", "bits": 1, "shape": shape, "salient": k, "symmetric": True}
    if method not in ("salient", "rtn"):
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "rtn":
        k = 0
    if act_sq is None:
        act_sq = torch.ones(shape[1])
    sd = salient_quantize(delta.float(), act_sq, bits, k, symmetric, clip_ratio)
    meta = {"method": method, "bits": bits, "shape": shape, "salient": k, "symmetric": symmetric}
    return encode_salient(sd), meta





def encode_sign2d(delta: Tensor, k: int, act_sq: Tensor | None) -> dict[str, Tensor]:
    """Signs with row and column scales (:func:`~meswitch.compress.quant.sign2d`); the k input
    channels with the largest activation-weighted error of that fit stay in fp16."""
    delta = delta.float()
    act = torch.ones(delta.shape[1]) if act_sq is None else act_sq.float()
    idx = torch.zeros(0, dtype=torch.long)
    if k:
        c, r, col = sign2d(delta, act)
        idx = torch.topk(channel_error(delta, sign2d_dequantize(c, r, col), act), k).indices.sort().values
    keep = torch.ones(delta.shape[1], dtype=torch.bool)
    keep[idx] = False
    codes, row, col = sign2d(delta[:, keep], act[keep])
    return {"codes": pack(codes, 1), "scale": row.to(torch.float16), "col_scale": col.to(torch.float16),
            **_salient_fields(delta.shape[1], idx, delta[:, idx])}


def decode_sign2d(fields: dict[str, Tensor], meta: dict[str, Any]) -> Tensor:
    out, n = meta["shape"]
    k = int(meta["salient"])
    rest = sign2d_dequantize(unpack(fields["codes"], 1, n - k), fields["scale"].float(), fields["col_scale"].float())
    if not k:
        return rest
    idx = fields["salient_idx"].long()
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    full = rest.new_zeros(out, n)
    full[:, keep] = rest
    full[:, idx] = fields["salient_cols"].float()
    return full


def decode_delta(fields: dict[str, Tensor], meta: dict[str, Any]) -> Tensor:
    """Dense float32 delta from stored tensors: ``[out, in]`` (or the stored shape for ``dense``)."""
    method = meta["method"]
    if method == "dense":
        return fields["delta"].float()
    if method == "bitdelta":
        out, n = meta["shape"]
        return dequantize(unpack(fields["codes"], 1, n), fields["scale"].float(), None, 1)
    if method in ("salient", "rtn"):
        return decode_salient(fields, meta).dequantize()
    if method == "sign2d":
        return decode_sign2d(fields, meta)
    raise ValueError(f"unknown method {method!r} in layer meta")


def layer_bits(fields: dict[str, Tensor], meta: dict[str, Any]) -> float:
    """Stored bits per delta parameter of one layer (all fields counted)."""
    numel = 1
    for d in meta["shape"]:
        numel *= int(d)
    return 8 * sum(t.numel() * t.element_size() for t in fields.values()) / numel
