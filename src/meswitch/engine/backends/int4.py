"""``int4``: deltas in PyTorch's int4 weight-only CPU layout (:mod:`meswitch.engine.kernels.int4`).

A delta keeps its packed codes (for merges and the exact parts) and, beside them, the kernel's
layout: half a byte per weight, activations in bf16. A step converts its rows to bf16 once per
call and makes one kernel call per expert and layer. Shapes the kernel cannot take keep the exact
path (:class:`~meswitch.engine.backends.forms.PackedForm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meswitch.deltas import QuantizedDelta
from meswitch.engine.backends.base import DeltaBackend, Work, add_rows
from meswitch.engine.backends.forms import Form, PackedForm
from meswitch.engine.kernels import int4
from meswitch.engine.kernels.int4 import Int4Delta


@dataclass(frozen=True, eq=False)
class Int4Form:
    """``kernel``: the quantized columns in the int4 layout; ``parts``: the stored codes, grid and salient columns."""

    kernel: Int4Delta
    parts: PackedForm

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts.shape

    @property
    def whole(self) -> bool:
        """Whether one kernel call on the bf16 rows gives the whole delta (no salient columns, no column scales)."""
        return self.kernel.unit_scale and not self.parts.k

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> float32 ``[n, out]``: the kernel's part plus the salient columns in float32."""
        return self.parts.add_salient(x, self.kernel.matmul(x))

    def dequantize(self) -> Tensor:
        return self.parts.dequantize()

    def nbytes(self) -> int:
        return self.parts.nbytes() + self.kernel.nbytes()


def int4_form(delta: QuantizedDelta, device: torch.device) -> Form:
    """The int4 form of ``delta``, or its :class:`PackedForm` where the kernel cannot take it."""
    parts = PackedForm.of(delta, device)
    kernel = int4.build(delta.codes, parts.rest_idx, parts.scale, parts.zero, delta.bits, delta.shape,
                        parts.col_scale) if device.type == "cpu" else None
    return parts if kernel is None else Int4Form(kernel, parts)


def add_int4_rows(x: Tensor, y: Tensor, work: Sequence[Work]) -> list[Work]:
    """Add the items whose form is a whole :class:`Int4Form` (one kernel call each, ``x`` converted to bf16
    once); returns the items left for another path."""
    xb, left = None, []
    for item in work:
        form, s, t, c = item
        if isinstance(form, Int4Form) and form.whole:
            xb = x.to(torch.bfloat16) if xb is None else xb
            add_rows(y, s, t, c, form.kernel.mm(xb[s:t]))
        else:
            left.append(item)
    return left


class Int4Backend(DeltaBackend):
    """PyTorch's int4 weight-only kernel, one call per expert and layer (module docstring)."""

    name = "int4"

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        return int4_form(delta, self.device)

    def add(self, x: Tensor, y: Tensor, work: Sequence[Work], state: dict[str, Any]) -> None:
        super().add(x, y, add_int4_rows(x, y, work), state)
