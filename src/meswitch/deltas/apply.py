"""Materialise an expert from the base and its stored delta: the slow, obvious reference path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from meswitch.deltas.records import decode_delta


@torch.no_grad()
def apply_delta(model: nn.Module, layers: dict[str, dict[str, Tensor]], meta: dict[str, dict[str, Any]]) -> nn.Module:
    """Add every stored delta to ``model``'s weights in place: ``W <- W_base + decode(delta)``.

    Keys of ``layers``/``meta`` are parameter owners: a linear layer's module name (its ``.weight``)
    or, for ``dense`` entries, the full parameter name.
    """
    params = dict(model.named_parameters())
    for name, m in meta.items():
        pname = name if m["method"] == "dense" else f"{name}.weight"
        if pname not in params:
            raise KeyError(f"the stored delta names {pname!r}, which the model does not have")
        p = params[pname]
        d = decode_delta(layers[name], m)
        if tuple(d.shape) != tuple(p.shape):
            raise ValueError(f"{pname}: stored delta is {list(d.shape)}, the model's weight {list(p.shape)}")
        p.add_(d.to(p.dtype))
    return model
