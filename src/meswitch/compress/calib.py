"""Calibration: which weights are deltas, and the input statistics of every decoder linear layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules inside the decoder blocks (``*.layers.<i>.*``), in order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


@torch.no_grad()
def collect_act_sq(model: nn.Module, blocks: Iterable[Tensor], names: list[str]) -> dict[str, Tensor]:
    """Mean squared input activation per input channel of each named linear layer.

    blocks: token id tensors ``[B, L]`` run through ``model``; returns ``{name: [in]}`` float32,
    ``act_sq_i = mean over every token of x_i**2``.
    """
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] += x.shape[0]

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        for ids in blocks:
            body(input_ids=ids)  # the decoder alone: the linear inputs, no [B, L, vocab] logits
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"no activations reached {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return {n: sums[n] / counts[n] for n in names}


@torch.no_grad()
def collect_hessians(model: nn.Module, blocks: Iterable[Tensor], names: list[str]) -> dict[str, Tensor]:
    """Input second-moment matrix ``H = mean over tokens of x x^T`` of each named linear layer.

    blocks: token id tensors ``[B, L]``; returns ``{name: [in, in]}`` float32. Layers fed the same
    tensor (q/k/v after one norm, gate/up after another) share one matrix object, so memory grows
    with the number of distinct inputs, not of layers.
    """
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    last: list = [None, ""]  # the previous layer's input tensor (held, so its memory is not reused) and name

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            if args[0] is last[0]:  # fed the very tensor the previous layer got
                alias[name] = alias.get(last[1], last[1])
                return
            last[0], last[1] = args[0], name
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        for ids in blocks:
            body(input_ids=ids)
    finally:
        last[0] = None
        for h in handles:
            h.remove()
    out = {n: sums[n] / counts[n] for n in sums}
    for n, first in alias.items():
        out[n] = out[first]
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"no activations reached {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return out


def collect_output_grad_sq(model: nn.Module, blocks: Iterable[Tensor], names: list[str]) -> dict[str, Tensor]:
    """Mean squared gradient of the next-token loss w.r.t. each named linear layer's output.

    blocks: token id tensors ``[B, L]`` (the loss: cross-entropy on their own next tokens, summed
    over tokens, so each token's gradient is its own); returns ``{name: [out]}`` float32,
    ``g_sq_j = mean over tokens of (dLoss/dy_j)**2``. With ``H`` from :func:`collect_hessians`,
    ``sum_j g_sq_j (E H E^T)_jj`` approximates (Fisher, Kronecker-factored) how much an error ``E``
    in that layer's weights raises the loss: it counts what the layers above do with the error,
    which ``tr(E H E^T)`` alone does not. Parameters get no gradients.
    """
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)

    def hook(name: str):
        def fn(_mod: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> None:
            def grad(g: Tensor) -> None:
                g = g.detach().float().reshape(-1, g.shape[-1])
                sums[name] = sums.get(name, 0) + g.square().sum(0)
                counts[name] += g.shape[0]

            if out.requires_grad:
                out.register_hook(grad)

        return fn

    def embed_hook(_mod: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return out.detach().requires_grad_()  # the graph starts here: no parameter needs a gradient

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    try:
        for ids in blocks:
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"no gradient reached {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return {n: sums[n] / counts[n] for n in names}
