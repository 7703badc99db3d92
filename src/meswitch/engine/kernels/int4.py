"""A low-bit CPU kernel path for ``x @ delta^T``: the delta's codes in PyTorch's int4 weight-only layout.

``torch._weight_int4pack_mm_for_cpu(x, w, g, sz)`` computes ``x @ W^T`` with
``W[j, i] = (q[j, i] - 8) * sz[i // g, j, 0] + sz[i // g, j, 1]`` from 4-bit codes ``q`` (0..15),
dequantizing inside the kernel: 0.5 byte per weight is read instead of 4. Codes of 1 to 4 bits fit
shifted, ``q = c + 8 - ceil(m)``. A stored delta ``(c - m) * s_j`` (symmetric, ``m = (2**b - 1) / 2``)
becomes ``S = s_j``, ``Z = (ceil(m) - m) * s_j``; an asymmetric one ``c * s_j + z_j`` becomes
``Z = ceil(m) * s_j + z_j`` (small offsets: bf16 scales then lose no precision to cancellation).
Salient columns are computed apart in float32; their code slots hold 0 and the activation is zeroed
there (``x_scale[i] = 0``); sign2d's per-column scale goes into ``x_scale`` too::

    x @ delta^T = int4_mm((x * x_scale).bf16) + x[:, salient_idx] @ salient_cols^T

Activations enter the kernel as bfloat16 (its fast path on CPUs without AVX512-BF16 too), so this
path is approximate to bf16 precision in the delta term; :meth:`~meswitch.engine.backends.forms.PackedForm.matmul` stays the exact
reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GROUPS = (256, 128, 64, 32)


def available() -> bool:
    """Whether this PyTorch has the CPU int4 weight-only kernels."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def group_size(in_features: int) -> int | None:
    """The largest supported group size dividing ``in_features`` (None: the kernel cannot take it)."""
    return next((g for g in GROUPS if in_features % g == 0), None)


@dataclass(frozen=True, eq=False)
class Int4Delta:
    """``packed`` (kernel layout of ``[out, in]`` codes), ``sz: bf16 [in / g, out, 2]``, ``x_scale: [in]``."""

    packed: Tensor
    group: int
    sz: Tensor
    x_scale: Tensor
    out_features: int
    unit_scale: bool = False  # x_scale is all ones (no salient columns, no column scales): no multiply

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.sz, self.x_scale))

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> float32 ``[n, out]``: the quantized columns' part of ``x @ delta^T``."""
        xb = x.to(torch.bfloat16) if self.unit_scale else (x.float() * self.x_scale).to(torch.bfloat16)
        return self.mm(xb).float()

    def mm(self, xb: Tensor) -> Tensor:
        """The bare kernel call: ``xb: bf16 [n, in]``, already scaled by ``x_scale`` -> bf16 ``[n, out]``.

        For callers that convert a step's rows once and reuse them across experts (unit-scale deltas).
        The kernel reads ``sz`` as contiguous whatever its strides (a column view gives wrong numbers
        silently), so a non-contiguous ``sz`` is copied for the call.
        """
        sz = self.sz if self.sz.is_contiguous() else self.sz.contiguous()
        return torch._weight_int4pack_mm_for_cpu(xb, self.packed, self.group, sz)


def build(codes: Tensor, rest_idx: Tensor, scale: Tensor, zero: Tensor | None, bits: int, shape: tuple[int, int],
          col_scale: Tensor | None = None) -> Int4Delta | None:
    """The int4 form of a delta's quantized columns; None where the kernel cannot take the shape.

    ``codes: uint8 [out, in - k]`` (unpacked), ``rest_idx: int64 [in - k]``, ``scale: [out]`` or ``[1]``,
    ``zero: [out] | None``; ``col_scale: [in - k]`` for sign2d (level ``(2c - 1) * s_j * col_scale_i``).
    """
    out, n = shape
    g = group_size(n)
    if not available() or g is None or codes.device.type != "cpu":
        return None
    s = scale.float().expand(out)
    if col_scale is not None:  # (2c - 1) s_j = (c - 1/2) * 2 s_j, the column factor moves to x
        s, m = 2 * s, 0.5
    else:
        m = ((1 << bits) - 1) / 2
    # Codes shifted so that q - 8 = c - ceil(m): the zero term stays small and bf16 does not cancel.
    shift = 8 - math.ceil(m)
    z = (math.ceil(m) - m) * s if zero is None else math.ceil(m) * s + zero.float()
    if len(rest_idx) == n:  # no salient columns: the codes are every column, in order
        q = codes.to(torch.int32).add_(shift)
    else:
        q = torch.zeros(out, n, dtype=torch.int32)
        q.index_copy_(1, rest_idx, codes.to(torch.int32).add_(shift))
    x_scale = torch.zeros(n)
    x_scale[rest_idx] = col_scale.float() if col_scale is not None else 1.0
    sz = torch.stack([s, z], -1)[None].expand(n // g, out, 2).contiguous().to(torch.bfloat16)
    unit = col_scale is None and len(rest_idx) == n  # every column quantized, none scaled
    return Int4Delta(torch._convert_weight_to_int4pack_for_cpu(q, 2), g, sz, x_scale, out, unit)
