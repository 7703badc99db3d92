"""``lowbit``: meswitch's low-bit CPU kernel (:mod:`meswitch.engine.kernels.lowbit_cpu`).

Each delta's codes are held in the kernel's layout **instead of** the packed ones (``bits / 8``
bytes a weight, 3-bit codes in 4-bit slots), its grid as ``level = c * scale + zero``. One kernel
call per step and layer (or group of layers reading the same input) computes every expert's rows,
each layer of a group on its own output columns. Salient columns are computed beside it in float32;
column-scaled (sign2d) deltas take the int4 form (:mod:`.int4`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meswitch.deltas import QuantizedDelta
from meswitch.deltas.records import PackedQuantizedDelta
from meswitch.engine.backends.base import Work
from meswitch.engine.backends.forms import Form, nbytes
from meswitch.engine.backends.int4 import Int4Backend, int4_form
from meswitch.engine.kernels import lowbit_cpu
from meswitch.engine.kernels.lowbit_cpu import LowbitDelta


@dataclass(frozen=True, eq=False)
class LowbitForm:
    """``kernel``: every code in the kernel's layout (0 in salient slots); the stored grid (``scale``,
    ``zero: float32 [out]``, ``bits``) and salient columns (``salient_idx: int64 [k]``,
    ``salient_cols: float32 [out, k]``, ``rest_idx: int64 [in - k]``) to give the delta back exactly."""

    kernel: LowbitDelta
    scale: Tensor
    zero: Tensor | None
    bits: int
    salient_idx: Tensor
    salient_cols: Tensor
    rest_idx: Tensor
    method: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.kernel.shape

    @property
    def whole(self) -> bool:
        """Whether the kernel's call gives the whole delta (no salient columns)."""
        return self.kernel.unit_scale

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> float32 ``[n, out]``: the kernel's part (int8 activations) plus salient columns."""
        y = self.kernel.matmul(x)
        if not self.whole:
            y.addmm_(x.float().index_select(1, self.salient_idx), self.salient_cols.T)
        return y

    def dequantize(self) -> Tensor:
        out, n = self.shape
        codes = lowbit_cpu.unlayout(self.kernel.packed, self.kernel.bits, out, n)
        codes = codes.index_select(1, self.rest_idx) if self.salient_idx.numel() else codes
        return QuantizedDelta(codes, self.scale, self.zero, self.bits, self.salient_idx, self.salient_cols,
                              method=self.method).dequantize()

    def nbytes(self) -> int:
        return self.kernel.nbytes() + nbytes(self.scale, self.zero, self.salient_cols, self.rest_idx)


class LowbitBackend(Int4Backend):
    """The low-bit kernel for every delta it takes, the int4 kernel for the others (module docstring).

    ``isa``: the kernel build (:func:`lowbit_cpu.choose`), fixed for the backend's life.
    """

    name = "lowbit"

    def __init__(self, device: torch.device | str = "cpu", isa: str | None = None) -> None:
        super().__init__(device)
        chosen, why = lowbit_cpu.choose("" if isa is None else isa)
        if chosen is None:
            raise RuntimeError(f"the low-bit CPU kernel is unavailable: {why}")
        self.isa = chosen

    def describe(self) -> str:
        return f"lowbit ({self.isa}) on {self.device}"

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        if delta.col_scale is not None or self.device.type != "cpu":
            return int4_form(delta, self.device)
        rest = delta.rest_idx
        if isinstance(delta, PackedQuantizedDelta):  # straight from the stored bytes, never unpacked
            kernel = lowbit_cpu.build_packed(delta.packed, rest, delta.scale, delta.zero, delta.bits, delta.shape,
                                             self.isa)
        else:
            kernel = lowbit_cpu.build(delta.codes, rest, delta.scale, delta.zero, delta.bits, delta.shape, self.isa)
        if kernel is None:
            return int4_form(delta, self.device)
        f32 = (lambda t: None if t is None else t.float())  # noqa: E731
        return LowbitForm(kernel, f32(delta.scale), f32(delta.zero), delta.bits, delta.salient_idx,
                          f32(delta.columns()), rest, delta.method)

    def add(self, x: Tensor, y: Tensor, work: Sequence[Work], state: dict[str, Any]) -> None:
        low, rest = [], []
        for item in work:
            form, s, t, c = item
            if isinstance(form, LowbitForm) and form.whole:
                low.append((form.kernel, s, t, c))
            else:
                rest.append(item)
        if low:
            if y.dtype == torch.float32 and y.stride(1) == 1:
                lowbit_cpu.sgmv(x, y, low, self.isa)
            else:
                acc = torch.zeros(y.shape, dtype=torch.float32)
                lowbit_cpu.sgmv(x, acc, low, self.isa)
                y.add_(acc.to(y.dtype))
        super().add(x, y, rest, state)
