"""The router's head: features -> domain logits, as pure functions over a dict of tensors.

Shapes: ``N`` texts, ``F`` features, ``H`` hidden units, ``C`` domains.

A head is ``{"mu": [F], "sigma": [F], "w1": [F, H], "b1": [H], "w2": [H, C], "b2": [C]}`` (``mlp``)
or ``{"mu", "sigma", "w": [F, C], "b": [C]}`` (``linear``); features are standardised with
``mu``/``sigma`` first. Saved as safetensors as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meswitch.router.errors import CorruptRouterError

if TYPE_CHECKING:
    import torch

Head = dict[str, "torch.Tensor"]
HEAD_KINDS = ("linear", "mlp")


def head_kind(head: Head) -> str:
    if {"mu", "sigma", "w", "b"} <= head.keys():
        return "linear"
    if {"mu", "sigma", "w1", "b1", "w2", "b2"} <= head.keys():
        return "mlp"
    raise CorruptRouterError(f"router head has tensors {sorted(head)}: neither a linear nor an MLP head")


def head_logits(head: Head, x: torch.Tensor) -> torch.Tensor:
    """``x: [N, F]`` -> logits ``[N, C]``: ``z = (x - mu) / sigma``, then ``z w + b`` or ``relu(z w1 + b1) w2 + b2``."""
    import torch

    z = (x - head["mu"]) / head["sigma"]
    if head_kind(head) == "linear":
        return z @ head["w"] + head["b"]
    return torch.relu(z @ head["w1"] + head["b1"]) @ head["w2"] + head["b2"]


def init_head(kind: str, mu: torch.Tensor, sigma: torch.Tensor, classes: int, hidden: int, seed: int) -> Head:
    """A fresh head of ``kind`` over features with mean ``mu: [F]`` and spread ``sigma: [F]``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    f = mu.numel()
    if kind == "linear":
        return {"mu": mu, "sigma": sigma, "w": torch.zeros(f, classes), "b": torch.zeros(classes)}
    if kind == "mlp":
        return {
            "mu": mu, "sigma": sigma,
            "w1": torch.randn(f, hidden, generator=g) / f**0.5, "b1": torch.zeros(hidden),
            "w2": torch.randn(hidden, classes, generator=g) / hidden**0.5, "b2": torch.zeros(classes),
        }
    raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")


def train_head(
    x: torch.Tensor, y: torch.Tensor, classes: int, kind: str = "mlp", hidden: int = 128, epochs: int = 60,
    lr: float = 3e-3, weight_decay: float = 1e-2, batch_size: int = 64, seed: int = 0,
) -> Head:
    """Fit a head on ``x: [N, F]`` features and ``y: [N]`` class ids in ``[0, classes)``.

    Cross-entropy with classes weighted by inverse frequency (so a large domain does not drown a
    small one), AdamW, mini-batches in a seeded order. Returns the head's tensors (no grad).
    """
    import torch

    mu = x.mean(0)
    sigma = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mu)
    head = init_head(kind, mu, sigma, classes, hidden, seed)
    params = {k: v.clone().requires_grad_(k not in ("mu", "sigma")) for k, v in head.items()}
    opt = torch.optim.AdamW([p for p in params.values() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    counts = torch.bincount(y, minlength=classes).float()
    weight = torch.where(counts > 0, counts.sum() / (classes * counts.clamp_min(1)), torch.zeros_like(counts))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head_logits(params, x[idx]), y[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().contiguous() for k, v in params.items()}


def score_head(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float = 1e-2, steps: int = 200) -> Head:
    """A head for features that already are class scores (``llm-choice``): ``logits = x + b``.

    ``x: [N, C]`` (one score per class), ``y: [N]``. ``b: [C]`` is fitted by cross-entropy plus
    ``l2 * |b|^2`` (LBFGS; the training text's own class mix acts as the prior, so train on a balanced
    one, as ``max_per_domain`` gives): it removes the base's prior preference for some
    domains (a chat model finds chat text likely after any prefix). Stored as a linear head with
    identity weights, ``mu = 0``, ``sigma = 1``.
    """
    import torch

    if x.shape[1] != classes:
        raise ValueError(f"score features must have one column per class: {x.shape[1]} != {classes}")
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x + b, y) + l2 * b.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mu": torch.zeros(classes), "sigma": torch.ones(classes), "w": torch.eye(classes), "b": b.detach().clone()}
