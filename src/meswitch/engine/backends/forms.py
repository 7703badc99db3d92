"""Resident forms of a layer delta: what a backend keeps of a :mod:`meswitch.deltas` record to serve it.

Every form answers three questions, whatever its layout:

- ``matmul(x: [n, in]) -> float32 [n, out]``: ``x @ delta^T`` (as exact as the form's kernel);
- ``dequantize() -> float32 [out, in]``: the stored delta, exactly (merged weights are built from it);
- ``nbytes()``: bytes held in memory.

The forms here are plain PyTorch (:class:`LowRankForm` serves LoRA factors in every backend, through the
LoRA kernel where the CPU has it: :func:`add_low_rank`); kernel
forms (:mod:`.int4`, :mod:`.lowbit`) wrap a :class:`PackedForm` or keep their own layout. A form never
changes once built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from meswitch.deltas import LowRankDelta, QuantizedDelta, pack, unpack
from meswitch.engine.kernels import lora_cpu


class Form(Protocol):
    """What a linear layer holds per expert (module docstring)."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def matmul(self, x: Tensor) -> Tensor: ...

    def dequantize(self) -> Tensor: ...

    def nbytes(self) -> int: ...


def nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True, eq=False)
class DenseForm:
    """A delta held whole: ``delta: [out, in]`` (16 bit for lossless stored deltas, float32 when dequantized)."""

    delta: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.delta.shape[0], self.delta.shape[1])

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> ``x @ delta^T: float32 [n, out]``."""
        return x.float() @ self.delta.float().T

    def dequantize(self) -> Tensor:
        return self.delta.float()

    def nbytes(self) -> int:
        return nbytes(self.delta)


@dataclass(frozen=True, eq=False)
class PackedForm:
    """A quantized delta as stored: ``packed: uint8 [out, packed_cols(in - k, bits)]``, grid
    ``scale: float32 [out]`` (``[1]``: bitdelta), ``zero: float32 [out] | None``, ``col_scale: [in - k] | None``
    (sign2d), ``salient_idx: int64 [k]``, ``salient_cols: float32 [out, k]``, ``rest_idx: int64 [in - k]``.
    ``float_codes: float32 [out, in - k] | None``: the codes unpacked once, for speed (else per call).

    :meth:`matmul` computes from the parts, never the dense delta (``x_r = x[:, rest_idx]``, codes ``c``)::

        x @ delta^T = x[:, salient_idx] @ salient_cols^T + q
        q = (x_r @ c^T - m * x_r.sum(1, keepdim=True)) * scale     # symmetric, m = (2**bits - 1) / 2
        q = (x_r @ c^T) * scale + x_r.sum(1, keepdim=True) * zero   # asymmetric
        sign2d: as symmetric at 1 bit with x_r * col_scale and 2 * scale, since 2c - 1 = 2 (c - 1/2)
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor | None
    col_scale: Tensor | None
    salient_idx: Tensor
    salient_cols: Tensor
    rest_idx: Tensor
    bits: int
    shape: tuple[int, int]
    method: str
    float_codes: Tensor | None = None

    @classmethod
    def of(cls, d: QuantizedDelta, device: torch.device, float_codes: bool = False) -> PackedForm:
        """The form of record ``d`` on ``device`` (``float_codes``: also keep the codes unpacked as float32)."""
        f32 = (lambda t: None if t is None else t.to(device, torch.float32))  # noqa: E731
        return cls(pack(d.codes, d.bits).to(device), f32(d.scale), f32(d.zero), f32(d.col_scale),
                   d.salient_idx.to(device), f32(d.columns()), d.rest_idx.to(device), d.bits, d.shape, d.method,
                   d.codes.to(device, torch.float32) if float_codes else None)

    @property
    def k(self) -> int:
        return self.salient_idx.shape[0]

    def codes(self) -> Tensor:
        """The quantized columns' codes: ``uint8 [out, in - k]``."""
        return unpack(self.packed, self.bits, self.shape[1] - self.k)

    def record(self) -> QuantizedDelta:
        return QuantizedDelta(self.codes(), self.scale, self.zero, self.bits, self.salient_idx, self.salient_cols,
                              self.col_scale, self.method)

    def dequantize(self) -> Tensor:
        return self.record().dequantize()

    def nbytes(self) -> int:
        return nbytes(self.packed, self.scale, self.zero, self.col_scale, self.salient_idx, self.salient_cols,
                      self.rest_idx, self.float_codes)

    def add_salient(self, x: Tensor, y: Tensor) -> Tensor:
        """``y += x[:, salient_idx] @ salient_cols^T`` (``x: [n, in]``, ``y: float32 [n, out]``); returns ``y``."""
        if self.k:
            y.addmm_(x.float().index_select(1, self.salient_idx), self.salient_cols.T)
        return y

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> ``x @ delta^T: float32 [n, out]`` from the parts (class docstring)."""
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"x must be [n, in={self.shape[1]}], got shape {tuple(x.shape)}")
        xf = x.float()
        c = self.float_codes if self.float_codes is not None else self.codes().float()  # [out, in - k]
        x_r = xf.index_select(1, self.rest_idx) if self.k else xf  # [n, in - k]
        scale = self.scale
        if self.col_scale is not None:
            x_r, scale = x_r * self.col_scale, self.scale * 2
        x_sum = x_r.sum(1, keepdim=True)  # [n, 1]
        y = x_r @ c.T  # [n, out]
        if self.zero is None:
            y.sub_(x_sum, alpha=((1 << self.bits) - 1) / 2).mul_(scale)
        else:
            y.mul_(scale).addcmul_(x_sum, self.zero)
        return self.add_salient(xf, y)


@dataclass(frozen=True, eq=False)
class LowRankForm:
    """A LoRA delta as its record, the factors in their stored 16 bits on the backend's device (``a: [r, in]``,
    ``b: [out, r]``, fp16 or bf16; ``delta = scale * b @ a``), never built by :meth:`matmul` (shrink to ``r``,
    then expand)::

        x @ delta^T = ((x @ a^T) * scale) @ b^T        # x: [n, in] -> [n, r] -> [n, out], float32 products

    ``kernel``: whether :mod:`meswitch.engine.kernels.lora_cpu` takes it (on a CPU that has the kernel),
    which reads the 16-bit factors directly; elsewhere each call widens them to float32 first. Either way
    the resident bytes are the stored factors' bytes and nothing else.
    """

    delta: LowRankDelta
    kernel: bool = False

    @classmethod
    def of(cls, d: LowRankDelta, device: torch.device) -> LowRankForm:
        """The form of record ``d`` on ``device``: its factors as a store holds them (16 bit, contiguous)."""
        f = d.fields()
        a, b = f["lora_a"].to(device).contiguous(), f["lora_b"].to(device).contiguous()
        return cls(replace(d, a=a, b=b), device.type == "cpu" and lora_cpu.takes(a, b) and lora_cpu.available())

    @property
    def shape(self) -> tuple[int, int]:
        return self.delta.shape

    def item(self, s: int, t: int, c: int) -> lora_cpu.Item:
        """The kernel's item for rows ``[s, t)`` and first output column ``c``."""
        return (self.delta.a, self.delta.b, self.delta.scale, s, t, c)

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> ``x @ delta^T: float32 [n, out]`` through the rank-``r`` bottleneck (class docstring)."""
        d = self.delta
        if x.dim() != 2 or x.shape[1] != d.shape[1]:
            raise ValueError(f"x must be [n, in={d.shape[1]}], got shape {tuple(x.shape)}")
        if self.kernel and x.device.type == "cpu":
            y = torch.zeros(x.shape[0], d.shape[0], dtype=torch.float32)
            lora_cpu.sgmv(x, y, [self.item(0, x.shape[0], 0)])
            return y
        return (x.float() @ d.a.float().T).mul_(d.scale) @ d.b.float().T

    def dequantize(self) -> Tensor:
        """``scale * b @ a``: float32 ``[out, in]``, the record's own."""
        return self.delta.dequantize()

    def nbytes(self) -> int:
        return nbytes(self.delta.a, self.delta.b)


def add_low_rank(x: Tensor, y: Tensor, work: Sequence[tuple[Form, int, int, int]]) -> list[tuple[Form, int, int, int]]:
    """``y[s:t, c:c + out] += x[s:t] @ delta^T`` for every item ``(form, s, t, c)`` of ``work`` whose form is a
    :class:`LowRankForm` the LoRA kernel takes, all in one kernel call (``x: [T, in]``, ``y: [T, N]``); returns
    the other items, for another path."""
    mine, rest = [], []
    for item in work:
        form, s, t, c = item
        if isinstance(form, LowRankForm) and form.kernel and x.device.type == "cpu" and s < t:
            mine.append(form.item(s, t, c))
        else:
            rest.append(item)
    if mine:
        if y.dtype == torch.float32 and y.stride(1) == 1:
            lora_cpu.sgmv(x, y, mine)
        else:
            acc = torch.zeros(y.shape, dtype=torch.float32)
            lora_cpu.sgmv(x, acc, mine)
            y.add_(acc.to(y.dtype))
    return rest
