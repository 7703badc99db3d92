"""``triton``: one Triton launch per layer adds every expert's rows on a CUDA GPU
(:mod:`meswitch.engine.kernels.sgmv_triton`), reading the store's packed codes directly.

Deltas are held as stored (:class:`~meswitch.engine.backends.forms.PackedForm`, ``bits / 8`` bytes a
weight); salient columns are added beside the launch in PyTorch; column-scaled (sign2d) deltas keep
their float codes and the PyTorch path. The kernel's table of a layer's forms is kept in the layer's
``state`` and rebuilt when the step's experts change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from meswitch.deltas import QuantizedDelta
from meswitch.engine.backends.base import DeltaBackend, Work, add_rows
from meswitch.engine.backends.forms import Form, PackedForm
from meswitch.engine.kernels import sgmv_triton
from meswitch.engine.segments import Segments


class TritonBackend(DeltaBackend):
    """Packed deltas through the Triton SGMV kernel (module docstring)."""

    name = "triton"

    def __init__(self, device: Any = "cuda") -> None:
        super().__init__(device)
        if not sgmv_triton.available():
            raise RuntimeError("the triton backend needs the triton package (it ships with CUDA builds of torch)")
        self._segments: tuple[tuple[int, tuple[tuple[int, int], ...]], Segments] | None = None

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        return PackedForm.of(delta, self.device, float_codes=delta.col_scale is not None)

    def add(self, x: Tensor, y: Tensor, work: Sequence[Work], state: dict[str, Any]) -> None:
        groups: dict[int, list[tuple[PackedForm, int, int]]] = {}
        rest = []
        for form, s, t, c in work:
            if sgmv_triton.supports(form) and s < t:
                groups.setdefault(c, []).append((form, s, t))  # type: ignore[arg-type]
            else:
                rest.append((form, s, t, c))
        for c, items in groups.items():
            forms = tuple(f for f, _, _ in items)
            out = forms[0].shape[0]
            sgmv_triton.sgmv_delta(x, self._segments_of(x.shape[0], items), self._table(state, c, forms),
                                   y[:, c : c + out])
            for f, s, t in items:
                if f.k:
                    add_rows(y, s, t, c, f.add_salient(x[s:t], x.new_zeros(t - s, out, dtype=torch.float32)))
        super().add(x, y, rest, state)

    def _table(self, state: dict[str, Any], column: int, forms: tuple[PackedForm, ...]) -> sgmv_triton.ExpertTable:
        """The kernel's table with row ``j`` for ``forms[j]``, kept in ``state`` while the forms stay the same."""
        held = state.get(("triton", column))
        if held is None or len(held[0]) != len(forms) or any(a is not b for a, b in zip(held[0], forms, strict=True)):
            held = (forms, sgmv_triton.ExpertTable.build(dict(enumerate(forms)), self.device))
            state[("triton", column)] = held
        return held[1]

    def _segments_of(self, rows: int, items: list[tuple[PackedForm, int, int]]) -> Segments:
        """Segments over ``rows`` with item ``j``'s rows labelled ``j`` (others -1), on the device; the last one
        is reused, since every layer of a step has the same rows."""
        key = (rows, tuple((s, t) for _, s, t in items))
        if self._segments is None or self._segments[0] != key:
            ids = [-1] * rows
            for j, (_, s, t) in enumerate(items):
                ids[s:t] = [j] * (t - s)
            self._segments = (key, Segments.from_ids(ids).to(self.device))
        return self._segments[1]
