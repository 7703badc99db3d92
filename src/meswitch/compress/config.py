"""Compression settings (no heavy imports: the CLI reads the defaults for --help)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meswitch.errors import MeswitchError

LOW_RANK_BUDGET = 1.5  # lowrank's default bits per parameter: the default store's size (docs/compression.md)


class CompressConfigError(MeswitchError, ValueError):
    """Settings that contradict each other or cannot describe a compression."""


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. ``salient``: k per matrix (int >= 1), a fraction of input channels (0 < f < 1),
    or None to take the largest k that keeps each matrix within ``target_bits``.

    ``lowrank`` stores each linear delta as its truncated SVD (16-bit factors, no calibration statistics,
    no distillation): at ``rank`` for every matrix, or, without ``rank``, at the largest rank per matrix
    whose factors fit within ``budget`` bits per parameter (:meth:`layer_rank`).

    The defaults are the setting benchmarks/compression.py measured best on the reference zoo
    (docs/compression.md): GPTQ codes at 1 and 2 bits, allocated over the matrices within 1.5 bits
    per parameter, step sizes then distilled for 20 steps at learning rate 1e-2 (benchmarks/distill_sweep.py:
    at 2e-3 math's perplexity ratio stayed at 1.027).
    """

    method: str = "gptq-mixed"
    bits: int = 2
    salient: float | None = None
    target_bits: float | None = None  # None: 1.5 for the mixed methods and lowrank, 2.1 for salient (``budget``)
    rank: int | None = None  # lowrank only: the same rank for every matrix (else sized by ``budget``)
    symmetric: bool = True
    clip_ratio: float | None = None  # grid extent / absmax; None: 0.7 at 2 bits, 1.0 otherwise (measured)
    distill_steps: int | None = None  # None: 20 for gptq-mixed, else 0 (see ``steps``)
    distill_lr: float = 1e-2
    calib_blocks: int = 16  # blocks of calib_len tokens for activation statistics and distillation
    calib_len: int = 256
    hessian_blocks: int = 32  # GPTQ: further blocks for the input second moments (see expert_hessians)
    eval_blocks: int = 4  # further blocks kept out of calibration, for the fidelity stored in the manifest

    def __post_init__(self) -> None:
        if self.rank is not None and self.method != "lowrank":
            raise CompressConfigError(f"a rank applies to method 'lowrank' only, not {self.method!r}")
        if self.method != "lowrank":
            return
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise CompressConfigError(f"lowrank: rank must be a positive integer, got {self.rank!r}")
        if self.rank is not None and self.target_bits is not None:
            raise CompressConfigError("lowrank: give a rank or a bit budget (target_bits), not both")
        if self.target_bits is not None and not self.target_bits > 0:  # also refuses NaN
            raise CompressConfigError(f"lowrank: target_bits must be positive, got {self.target_bits}")
        if self.distill_steps:
            raise CompressConfigError("lowrank has no quantization grid to distil: distill_steps must be 0 or None")

    @property
    def budget(self) -> float:
        """Bits per delta parameter that ``mixed``/``gptq-mixed`` allocate and ``salient`` sizes k by."""
        if self.target_bits is not None:
            return self.target_bits
        if self.method == "lowrank":
            return LOW_RANK_BUDGET
        return 1.5 if self.method in ("mixed", "gptq-mixed") else 2.1

    @property
    def steps(self) -> int:
        """Distillation steps actually run (see ``distill_steps``)."""
        if self.distill_steps is not None:
            return self.distill_steps
        return 20 if self.method == "gptq-mixed" else 0

    @property
    def clip(self) -> float:
        """The grid extent actually used (see ``clip_ratio``)."""
        if self.clip_ratio is not None:
            return self.clip_ratio
        return 0.7 if self.bits == 2 else 1.0

    def layer_rank(self, out_features: int, in_features: int, layer: str = "") -> int:
        """The rank ``lowrank`` stores a ``[out, in]`` delta at: ``rank`` when set (at most ``min(out, in)``),
        else the largest ``r`` with ``16 r (out + in) / (out in) <= budget``, at least 1 and at most ``min(out, in)``.
        """
        full = min(out_features, in_features)
        if self.rank is not None:
            if self.rank > full:
                where = f"layer {layer!r} " if layer else ""
                raise CompressConfigError(f"lowrank: rank {self.rank} exceeds the rank of {where}[{out_features}, "
                                          f"{in_features}] (at most {full})")
            return self.rank
        fit = math.floor(self.budget * out_features * in_features / (16 * (out_features + in_features)) + 1e-9)
        return max(1, min(full, fit))
