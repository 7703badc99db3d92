"""Delta backends: how resident expert deltas are held and applied (the interface: :mod:`.base`).

:data:`BACKENDS` names them; :func:`select` picks one when the engine starts. A new backend is
one module with a :class:`~meswitch.engine.backends.base.DeltaBackend` subclass plus its line in
:data:`BACKENDS` (and in ``tests/test_backends.py``'s list, which checks it against the reference).

| name | holds per delta | ``add`` |
|---|---|---|
| ``reference`` | packed codes | ``x @ dequantize()^T`` per expert (slow, obvious) |
| ``pytorch`` | packed + float32 codes | products from codes and grid, per expert |
| ``dense`` | the dequantized delta | one float32 matmul per expert |
| ``int4`` | packed + PyTorch's int4 layout | one int4 kernel call per expert (bf16 activations) |
| ``lowbit`` | the low-bit kernel's layout only | one call per layer for every expert (int8 activations) |
| ``triton`` | packed codes on the GPU | one Triton launch per layer for every expert |

LoRA experts' factors are held alike by every backend, in their stored 16 bits (``LowRankForm``); every
backend but ``reference`` adds all LoRA segments of a call with one call of the LoRA CPU kernel
(:mod:`meswitch.engine.kernels.lora_cpu`) where the CPU has it.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from meswitch.engine.backends.base import DeltaBackend, ReferenceBackend, Work
from meswitch.errors import MeswitchError

log = logging.getLogger(__name__)

# name -> "module:class", imported when chosen (the kernels' modules import only what they need)
BACKENDS: dict[str, str] = {
    "reference": "meswitch.engine.backends.base:ReferenceBackend",
    "pytorch": "meswitch.engine.backends.pytorch:PyTorchBackend",
    "dense": "meswitch.engine.backends.pytorch:DenseBackend",
    "int4": "meswitch.engine.backends.int4:Int4Backend",
    "lowbit": "meswitch.engine.backends.lowbit:LowbitBackend",
    "triton": "meswitch.engine.backends.triton:TritonBackend",
}
AUTO = "auto"
# What "auto" tries, first that works: Triton on CUDA; on a CPU the low-bit kernel, then PyTorch's int4 one.
_AUTO_ORDER = {"cuda": ("triton", "pytorch"), "cpu": ("lowbit", "int4", "pytorch")}
# What a backend that cannot run here falls back to.
_FALLBACK = {"lowbit": "int4", "int4": "pytorch", "triton": "pytorch"}


class UnknownBackendError(MeswitchError, ValueError):
    """A backend name that is neither ``auto`` nor registered in :data:`BACKENDS`."""


@dataclass(frozen=True)
class Selection:
    """The backend chosen and why (``notes``: each backend passed over and its reason)."""

    backend: DeltaBackend
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        passed = f" (passed over: {'; '.join(self.notes)})" if self.notes else ""
        return f"delta backend: {self.backend.describe()}{passed}"


def backend_class(name: str) -> type[DeltaBackend]:
    """The class registered as ``name``; ValueError naming the choices if there is none."""
    if name not in BACKENDS:
        raise UnknownBackendError(f"unknown delta backend {name!r}; expected {AUTO!r} or one of {list(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, device: torch.device | str = "cpu", **options: object) -> DeltaBackend:
    """Backend ``name`` on ``device``; raises RuntimeError when it cannot run here (no kernel, no GPU)."""
    device = torch.device(device)
    if name == "lowbit":
        if device.type != "cpu":
            raise RuntimeError("the lowbit backend runs on CPUs only")
        from meswitch.engine.kernels import lowbit_cpu

        isa, why = lowbit_cpu.choose(options.get("isa"))  # type: ignore[arg-type]
        if isa is None:
            raise RuntimeError(f"the low-bit CPU kernel is unavailable: {why}")
        return backend_class(name)(device, isa=isa)  # type: ignore[call-arg]
    if name == "int4":
        from meswitch.engine.kernels import int4

        if device.type != "cpu":
            raise RuntimeError("the int4 backend runs on CPUs only")
        if not int4.available():
            raise RuntimeError("this PyTorch has no int4 weight-only CPU kernel")
    if name == "triton" and device.type != "cuda":
        raise RuntimeError("the triton backend runs on CUDA devices only")
    return backend_class(name)(device)


def select(name: str = AUTO, device: torch.device | str = "cpu", isa: str | None = None) -> Selection:
    """The backend for ``name`` on ``device``, chosen once at start-up.

    ``auto`` takes the fastest that works here (Triton on CUDA; the low-bit kernel, else int4, else
    PyTorch on a CPU). A named backend that cannot run here falls back (lowbit -> int4 -> pytorch,
    triton -> pytorch) and the reason is kept in :attr:`Selection.notes`. ``isa``: the low-bit
    kernel's build (None: ``MESWITCH_LOWBIT_CPU``, read now, else the best this CPU has).
    """
    device = torch.device(device)
    if name != AUTO:
        backend_class(name)  # unknown names fail here, before any fallback
    chain = list(_AUTO_ORDER["cuda" if device.type == "cuda" else "cpu"]) if name == AUTO else [name]
    while chain[-1] in _FALLBACK:
        chain.append(_FALLBACK[chain[-1]])
    notes = []
    for candidate in dict.fromkeys(chain):
        try:
            return Selection(create(candidate, device, isa=isa), tuple(notes))
        except RuntimeError as exc:
            notes.append(f"{candidate}: {exc}")
    raise RuntimeError(f"no delta backend runs on {device}: {'; '.join(notes)}")


__all__ = ["AUTO", "BACKENDS", "DeltaBackend", "ReferenceBackend", "Selection", "UnknownBackendError", "Work",
           "backend_class", "create", "select"]
