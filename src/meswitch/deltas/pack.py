"""Bit packing of integer codes along the last dim, each row independently.

Layout: row r of ``codes: [out, n]`` is one little-endian bitstream. Code k occupies stream bits
``[k*bits, (k+1)*bits)`` (its least significant bit first), and stream bit i is bit ``i % 8`` of
byte ``i // 8`` of the row. The row is padded with zero bits to whole bytes, so a packed row is
exactly ``ceil(n * bits / 8)`` bytes: 8 codes of 3 bits fill 3 bytes, and the columns of one row
can be unpacked without touching any other row.

The fast path works on groups of 8 codes, which always fill exactly ``bits`` bytes: the 8 codes of
a group are or-ed into one int64 word, which is split into ``bits`` bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

VALID_BITS = (1, 2, 3, 4)
_GROUP = 8  # codes per group; a group of 8 codes is exactly `bits` bytes


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is one of 1, 2, 3, 4; raise ValueError naming it otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return bits


def packed_cols(n: int, bits: int) -> int:
    """Bytes per packed row of ``n`` codes at ``bits`` bits: ``ceil(n * bits / 8)``."""
    check_bits(bits)
    if n < 0:
        raise ValueError(f"number of codes per row must be >= 0, got {n}")
    return (n * bits + 7) // 8


def _check_uint8(t: Tensor, name: str) -> None:
    if t.dtype != torch.uint8:
        raise TypeError(f"{name} must be torch.uint8, got {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim [..., cols], got a scalar")


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack ``codes: uint8 [out, n]`` (values in ``[0, 2**bits)``) into ``uint8 [out, packed_cols(n, bits)]``.

    Leading dims are arbitrary (``[..., n] -> [..., packed_cols(n, bits)]``); the layout is in the
    module docstring. Exact inverse: ``unpack(pack(c, b), b, n) == c``.
    """
    check_bits(bits)
    _check_uint8(codes, "codes")
    lead, n = codes.shape[:-1], codes.shape[-1]
    if codes.numel() and (top := int(codes.max())) >= 1 << bits:
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, got a code {top}")
    rows, groups = math.prod(lead), -(-n // _GROUP)
    grouped = F.pad(codes.reshape(rows, n), (0, groups * _GROUP - n)).view(rows, groups, _GROUP)
    word = torch.zeros(rows, groups, dtype=torch.int64, device=codes.device)
    for j in range(_GROUP):  # 8 vectorised steps, one per position in the group
        word |= grouped[..., j].to(torch.int64) << (j * bits)
    split = torch.stack([(word >> (8 * m)) & 0xFF for m in range(bits)], dim=-1)  # [rows, groups, bits]
    packed = split.to(torch.uint8).reshape(rows, groups * bits)[:, : packed_cols(n, bits)]
    return packed.reshape(*lead, -1).contiguous()


def check_packed(packed: Tensor, bits: int, n: int) -> None:
    """Raise as :func:`unpack` does unless ``packed`` is ``uint8 [..., packed_cols(n, bits)]`` at valid ``bits``."""
    check_bits(bits)
    _check_uint8(packed, "packed")
    width, expected = packed.shape[-1], packed_cols(n, bits)
    if width != expected:
        raise ValueError(
            f"packed rows of {n} codes at {bits} bits must be {expected} bytes wide, got {width} "
            f"(packed shape {tuple(packed.shape)})"
        )


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack`: ``packed: uint8 [out, packed_cols(n, bits)]`` -> ``codes: uint8 [out, n]``."""
    check_packed(packed, bits, n)
    width = packed.shape[-1]
    lead = packed.shape[:-1]
    rows, groups = math.prod(lead), -(-n // _GROUP)
    split = F.pad(packed.reshape(rows, width), (0, groups * bits - width)).view(rows, groups, bits)
    mask = (1 << bits) - 1
    if 8 % bits == 0:  # 1, 2, 4 bits: no code straddles a byte, so stay in uint8 (8x less memory traffic)
        codes = torch.stack([(split[..., j * bits // 8] >> (j * bits % 8)) & mask for j in range(_GROUP)], dim=-1)
        return codes.reshape(rows, groups * _GROUP)[:, :n].reshape(*lead, n).contiguous()
    word = torch.zeros(rows, groups, dtype=torch.int64, device=packed.device)
    for m in range(bits):
        word |= split[..., m].to(torch.int64) << (8 * m)
    codes = torch.stack([(word >> (j * bits)) & mask for j in range(_GROUP)], dim=-1)  # [rows, groups, 8]
    codes = codes.to(torch.uint8).reshape(rows, groups * _GROUP)[:, :n]
    return codes.reshape(*lead, n).contiguous()
