"""The delta backend interface: how a linear layer's expert deltas are held and applied.

A backend is chosen once, when the engine starts (:func:`meswitch.engine.backends.select`), and
serves every layer. It has two jobs:

- ``prepare(delta)``: the resident form of a :mod:`meswitch.deltas` record (:mod:`.forms`), on the
  backend's device;
- ``add(x, y, work, state)``: for every ``(form, s, t, c)`` of ``work``, in plain PyTorch::

      y[s:t, c:c + out] += x[s:t] @ form.dequantize().T          # x: [T, in], y: [T, N]

  ``work`` holds every expert's rows of one layer (or of a group of layers reading the same input,
  each on its own output columns) for one step: a backend may batch them into one kernel call.
  Rows ``[s, t)`` of different items never overlap within one column range. ``state`` is a dict
  the calling layer keeps for the backend (derived data such as a kernel's table), cleared when the
  layer's experts change.

:class:`ReferenceBackend` is the slow, obviously correct statement of ``add``; every backend is
tested against it (``tests/test_backends.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from meswitch.deltas import DenseDelta, LayerDelta, LowRankDelta, QuantizedDelta
from meswitch.engine.backends.forms import DenseForm, Form, LowRankForm, PackedForm, add_low_rank

Work = tuple[Form, int, int, int]  # (form, first row, end row, first output column)


class DeltaBackend:
    """Base class: prepares dense records as :class:`DenseForm` and LoRA factors as :class:`LowRankForm`
    (in every backend); adds every LoRA item of a call in one LoRA kernel call where the CPU has the kernel
    (:func:`~meswitch.engine.backends.forms.add_low_rank`), each other item with ``form.matmul``."""

    name: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def describe(self) -> str:
        """One line naming the backend and what it runs on (logged at start-up)."""
        return f"{self.name} on {self.device}"

    def prepare(self, delta: LayerDelta) -> Form:
        """The resident form of ``delta`` (a linear layer's ``[out, in]`` delta) on this backend's device."""
        if isinstance(delta, DenseDelta):
            return DenseForm(delta.delta.to(self.device))
        if isinstance(delta, LowRankDelta):
            return LowRankForm.of(delta, self.device)
        if not isinstance(delta, QuantizedDelta):
            raise TypeError(f"expected a QuantizedDelta, DenseDelta or LowRankDelta record, got {type(delta).__name__}")
        return self.prepare_quantized(delta)

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        return PackedForm.of(delta, self.device)

    def add(self, x: Tensor, y: Tensor, work: Sequence[Work], state: dict[str, Any]) -> None:
        """``y[s:t, c:c + out] += x[s:t] @ delta^T`` for each ``(form, s, t, c)`` (module docstring)."""
        for form, s, t, c in add_low_rank(x, y, work):
            add_rows(y, s, t, c, form.matmul(x[s:t]))


def add_rows(y: Tensor, s: int, t: int, c: int, part: Tensor) -> None:
    """``y[s:t, c:c + part.shape[1]] += part`` in place on the view (``y[...] += ...`` would copy it back too)."""
    y[s:t, c : c + part.shape[1]].add_(part.to(y.dtype))


class ReferenceBackend(DeltaBackend):
    """The slow reference: holds the packed codes, and adds ``x @ dequantize()^T`` per item."""

    name = "reference"

    def add(self, x: Tensor, y: Tensor, work: Sequence[Work], state: dict[str, Any]) -> None:
        for form, s, t, c in work:
            add_rows(y, s, t, c, x[s:t].float() @ form.dequantize().T)
