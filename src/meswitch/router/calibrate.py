"""Calibration: temperature scaling and the expected calibration error.

Shapes: ``N`` texts, ``C`` domains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The ``T > 0`` minimising the cross-entropy of ``softmax(logits / T)`` on ``labels``.

    logits: ``[N, C]``, labels: ``[N]``. Optimised over ``log T`` (so T stays positive) with LBFGS,
    starting from 1; clamped to [0.05, 20] so a perfectly separated split cannot send it to 0. If
    LBFGS ends on a non-finite value, the best of 61 log-spaced values in [0.05, 20] is taken.
    """
    import torch

    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)
    logits = logits.detach().float()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp().clamp(0.05, 20.0))
    if math.isfinite(t):
        return t
    # LBFGS can step into overflow on a tiny, perfectly separated split: take the best T on a grid instead
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 61)
    losses = torch.stack([torch.nn.functional.cross_entropy(logits / g, labels) for g in grid])
    return float(grid[int(torch.nan_to_num(losses, nan=float("inf")).argmin())])


def reliability(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> list[dict[str, float]]:
    """Per equal-width confidence bin over [0, 1]: ``count``, mean ``confidence``, ``accuracy``.

    confidence: ``[N]`` in [0, 1] (the probability of the predicted class); correct: ``[N]`` bool.
    Empty bins are left out. A confidence of exactly 1 falls in the last bin.
    """
    idx = (confidence * bins).long().clamp(0, bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n:
            out.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n,
                        "confidence": float(confidence[sel].mean()), "accuracy": float(correct[sel].float().mean())})
    return out


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE: ``sum_b (n_b / N) * |accuracy_b - confidence_b|`` over equal-width bins (``reliability``)."""
    n = len(confidence)
    if n == 0:
        return 0.0
    return sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(confidence, correct, bins))
