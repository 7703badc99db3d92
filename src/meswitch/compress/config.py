"""Compression settings (no heavy imports: the CLI reads the defaults for --help)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. ``salient``: k per matrix (int >= 1), a fraction of input channels (0 < f < 1),
    or None to take the largest k that keeps each matrix within ``target_bits``.

    The defaults are the setting benchmarks/compression.py measured best on the reference zoo
    (docs/compression.md): GPTQ codes at 1 and 2 bits, allocated over the matrices within 1.5 bits
    per parameter, step sizes then distilled for 20 steps at learning rate 1e-2 (benchmarks/distill_sweep.py:
    at 2e-3 math's perplexity ratio stayed at 1.027).
    """

    method: str = "gptq-mixed"
    bits: int = 2
    salient: float | None = None
    target_bits: float | None = None  # None: 1.5 for the mixed methods, 2.1 for salient (see ``budget``)
    symmetric: bool = True
    clip_ratio: float | None = None  # grid extent / absmax; None: 0.7 at 2 bits, 1.0 otherwise (measured)
    distill_steps: int | None = None  # None: 20 for gptq-mixed, else 0 (see ``steps``)
    distill_lr: float = 1e-2
    calib_blocks: int = 16  # blocks of calib_len tokens for activation statistics and distillation
    calib_len: int = 256
    hessian_blocks: int = 32  # GPTQ: further blocks for the input second moments (see expert_hessians)
    eval_blocks: int = 4  # further blocks kept out of calibration, for the fidelity stored in the manifest

    @property
    def budget(self) -> float:
        """Bits per delta parameter that ``mixed``/``gptq-mixed`` allocate and ``salient`` sizes k by."""
        if self.target_bits is not None:
            return self.target_bits
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
