"""A decoder as a stack of blocks: find the blocks, catch what the first one receives, and recompute
each block's activations in backward instead of keeping them (the memory tools of calibration and
distillation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks (the ``nn.ModuleList`` named ``*layers``) and their name, e.g. ``model.layers``."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] == "layers"]
    if len(found) != 1:
        raise ValueError(f"expected one ModuleList of decoder blocks named '*layers', found {[n for n, _ in found]}")
    return found[0]


class _Caught(Exception):
    """Raised by the hook on the first decoder block: its inputs are all :func:`block_inputs` wants."""


@torch.no_grad()
def block_inputs(model: nn.Module, blocks: Iterable[Tensor]) -> list[tuple[Tensor, dict]]:
    """What the first decoder block receives for each ``[B, L]`` batch of token ids: ``(hidden [B, L, H],
    keyword arguments)`` (masks, positions, rotary embeddings). The blocks above are not run."""
    _, layers = decoder_layers(model)
    caught: list[tuple[Tensor, dict]] = []

    def catch(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        caught.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _Caught

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    try:
        for ids in blocks:
            with contextlib.suppress(_Caught):
                body(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return caught


@contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, each decoder block of ``model`` keeps only its input for backward and
    recomputes its activations there (activation checkpointing): one block's activations are alive
    at a time instead of every block's, for one more forward of the model per step."""
    _, layers = decoder_layers(model)

    def wrap(forward: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        return run

    for layer in layers:
        layer.forward = wrap(layer.forward)  # an instance attribute: names and hooks stay as they are
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
