"""A CPU kernel for the LoRA experts of a mixed batch: every segment's shrink and expand in one call,
from the 16-bit factors as stored (Punica's SGMV for low-rank deltas, on a CPU)::

    for (a, b, scale, s, t, c) in items:                          # a: [r, in], b: [out, r], 16 bit
        y[s:t, c:c + out] += ((x[s:t] @ a^T) * scale) @ b^T       # x: float32 [T, in], y: float32 [T, N]

Each factor value is widened to float32 in registers as it is read (F16C for fp16, a shift for bf16),
and every product and sum is float32: the result equals the float32 matmuls on the widened factors up
to the order of the sums. So a resident LoRA expert holds its factors once, in their stored 16 bits,
and no float32 copy (:class:`~meswitch.engine.backends.forms.LowRankForm`). The items of one call are
split among the threads (``at::parallel_for``); their (rows, columns) regions of ``y`` must not overlap.

The C++ source (``csrc/lora_cpu.cpp``) is compiled on first use by :func:`torch.utils.cpp_extension.load_inline` (about
20 s, then cached under the meswitch cache) for AVX2 + FMA + F16C. Without them or a compiler,
:func:`available` is False and callers keep the per-item PyTorch path; :func:`sgmv_reference` is the
plain PyTorch statement of what the kernel computes.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from meswitch.engine.kernels.cpu_build import compile_kernel, cpu_flags

NEEDS = frozenset({"avx2", "fma", "f16c"})
FLAGS = ["-mavx2", "-mfma", "-mf16c"]
Item = tuple[Tensor, Tensor, float, int, int, int]  # (a: [r, in], b: [out, r], scale, first row, end row, column)

_SOURCE = Path(__file__).parent / "csrc" / "lora_cpu.cpp"


@functools.cache
def _build() -> tuple[object | None, str | None]:
    """The compiled kernel, or None and why there is none."""
    if platform.machine() not in ("x86_64", "AMD64") or not cpu_flags() >= NEEDS:
        return None, f"this CPU ({platform.machine()}) lacks {' + '.join(sorted(NEEDS))}"
    return compile_kernel("meswitch_lora_cpu", "lora_cpu-avx2", _SOURCE, FLAGS, "LoRA CPU kernel",
                          functions=["sgmv"])


def available() -> bool:
    """Whether the kernel runs on this CPU (compiles it on first call)."""
    return _build()[0] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _build()[1]


def takes(a: Tensor, b: Tensor) -> bool:
    """Whether the kernel takes factors ``a``, ``b``: both fp16 or both bf16, contiguous, on the CPU."""
    return (a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
            and a.is_contiguous() and b.is_contiguous())


def sgmv(x: Tensor, y: Tensor, items: Sequence[Item]) -> None:
    """``y[s:t, c:c + out] += ((x[s:t] @ a^T) * scale) @ b^T`` for each ``(a, b, scale, s, t, c)`` in one call
    (module docstring). ``x: float32 [T, in]``, ``y: float32 [T, N]``, both with unit column stride (``y``
    may be a column slice of a wider output); the items' regions of ``y`` must not overlap. RuntimeError
    if the kernel is unavailable or an item does not fit ``x`` and ``y``."""
    mod, why = _build()
    if mod is None:
        raise RuntimeError(f"the LoRA CPU kernel is unavailable: {why}")
    if not items:
        return
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.float().contiguous()
    mod.sgmv(x, y, [i[0] for i in items], [i[1] for i in items], [float(i[2]) for i in items],
             [i[3] for i in items], [i[4] for i in items], [i[5] for i in items])


def sgmv_reference(x: Tensor, y: Tensor, items: Sequence[Item]) -> None:
    """What :func:`sgmv` computes, in plain PyTorch (float32 products of the widened factors)."""
    for a, b, scale, s, t, c in items:
        y[s:t, c : c + b.shape[0]] += ((x[s:t].float() @ a.float().T) * scale) @ b.float().T
