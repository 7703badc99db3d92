"""Plain PyTorch backends: ``pytorch`` (codes unpacked once, kept as float32, products from the parts)
and ``dense`` (each delta dequantized once, one float32 matmul per expert)."""

from __future__ import annotations

from meswitch.deltas import QuantizedDelta
from meswitch.engine.backends.base import DeltaBackend
from meswitch.engine.backends.forms import DenseForm, Form, PackedForm


class PyTorchBackend(DeltaBackend):
    """``x @ delta^T`` from codes, step sizes and salient columns (:meth:`PackedForm.matmul`), no dense delta."""

    name = "pytorch"

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        return PackedForm.of(delta, self.device, float_codes=True)


class DenseBackend(DeltaBackend):
    """Each delta held dequantized (4 bytes a weight): one matmul per expert segment."""

    name = "dense"

    def prepare_quantized(self, delta: QuantizedDelta) -> Form:
        return DenseForm(delta.dequantize().to(self.device))
