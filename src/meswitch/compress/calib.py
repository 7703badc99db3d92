"""Calibration: which weights are deltas, and the input statistics of every decoder linear layer."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from meswitch.compress.blocks import block_inputs, checkpointed_blocks, decoder_layers


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


class _HessianSums:
    """Forward pre-hooks adding ``x^T x`` of each named linear layer's input; :meth:`result` divides
    by the token count. Layers fed the very tensor the previous hooked layer got (q/k/v after one norm,
    gate/up after another) share one matrix object, so memory grows with the number of distinct inputs."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = names
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.last: list = [None, ""]  # the previous input tensor (held, so its memory is not reused) and name
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            if args[0] is self.last[0]:  # fed the very tensor the previous layer got
                self.alias[name] = self.alias.get(self.last[1], self.last[1])
                return
            self.last[0], self.last[1] = args[0], name
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            self.sums[name] = self.sums.get(name, 0) + x.T @ x
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return fn

    def __enter__(self) -> _HessianSums:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.last[0] = None
        for h in self.handles:
            h.remove()

    def result(self) -> dict[str, Tensor]:
        """``{name: H [in, in]}`` for every hooked name (the sums are released)."""
        out = {n: self.sums.pop(n) / self.counts[n] for n in list(self.sums)}
        for n, first in self.alias.items():
            out[n] = out[first]
        missing = [n for n in self.names if n not in out]
        if missing:
            raise ValueError(f"no activations reached {missing[:3]} (and {max(0, len(missing) - 3)} more)")
        return out


@torch.no_grad()
def collect_hessians(model: nn.Module, blocks: Iterable[Tensor], names: list[str]) -> dict[str, Tensor]:
    """Input second-moment matrix ``H = mean over tokens of x x^T`` of each named linear layer.

    blocks: token id tensors ``[B, L]``; returns ``{name: [in, in]}`` float32. Layers fed the same
    tensor (q/k/v after one norm, gate/up after another) share one matrix object, so memory grows
    with the number of distinct inputs, not of layers. :func:`hessians_by_block` gives the same
    matrices holding one decoder block's at a time.
    """
    with _HessianSums(model, names) as acc:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model
        for ids in blocks:
            body(input_ids=ids)
    return acc.result()


@torch.no_grad()
def hessians_by_block(model: nn.Module, block_sets: Sequence[Iterable[Tensor]], names: list[str]
                      ) -> Iterator[tuple[list[str], list[dict[str, Tensor]]]]:
    """:func:`collect_hessians` for each set of token blocks, one decoder block at a time.

    Yields, for decoder block 0, 1, ... : the names inside it (in ``names`` order) and one
    ``{name: H [in, in]}`` per set, the matrices :func:`collect_hessians` ``(model, blocks, names)``
    would give. Each batch's hidden state (``[B, L, H]``) is cached and moved through one block at a
    time (GPTQ's layer-by-layer walk: one forward in all), so only one block's matrices are alive
    while the caller uses them, instead of every layer's.
    """
    prefix, layers = decoder_layers(model)
    groups = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    if sum(map(len, groups)) != len(names):
        outside = sorted(set(names) - {n for g in groups for n in g})
        raise ValueError(f"{outside[:3]} are not inside the decoder blocks {prefix}.<i>")
    states = [block_inputs(model, blocks) for blocks in block_sets]
    for layer, inside in zip(layers, groups, strict=True):
        per_set = []
        for batch in states:
            with _HessianSums(model, inside) as acc:
                for j, (hidden, kwargs) in enumerate(batch):
                    out = layer(hidden, **kwargs)
                    batch[j] = (out[0] if isinstance(out, tuple) else out, kwargs)
            per_set.append(acc.result())
        yield inside, per_set


def collect_output_grad_sq(model: nn.Module, blocks: Iterable[Tensor], names: list[str], chunk: int = 128
                           ) -> dict[str, Tensor]:
    """Mean squared gradient of the next-token loss w.r.t. each named linear layer's output.

    blocks: token id tensors ``[B, L]`` (the loss: cross-entropy on their own next tokens, summed
    over tokens, so each token's gradient is its own); returns ``{name: [out]}`` float32,
    ``g_sq_j = mean over tokens of (dLoss/dy_j)**2``. With ``H`` from :func:`collect_hessians`,
    ``sum_j g_sq_j (E H E^T)_jj`` approximates (Fisher, Kronecker-factored) how much an error ``E``
    in that layer's weights raises the loss: it counts what the layers above do with the error,
    which ``tr(E H E^T)`` alone does not. Parameters get no gradients. Memory: each decoder block's
    activations are recomputed in backward (:func:`~meswitch.compress.blocks.checkpointed_blocks`) and
    the loss is taken ``chunk`` tokens at a time (a token's gradient involves only its own logits).
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
    body, head = model.get_decoder(), model.get_output_embeddings()
    try:
        with checkpointed_blocks(model):  # one block's activations alive in backward, not every block's
            for ids in blocks:
                hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
                flat = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_()
                targets = ids[:, 1:].reshape(-1)
                for rows in torch.arange(len(targets)).split(chunk):  # [chunk, vocab] logits at a time
                    logits = head(flat[rows]).float()
                    torch.nn.functional.cross_entropy(logits, targets[rows], reduction="sum").backward()
                hidden.backward(flat.grad.view_as(hidden))
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    missing = [n for n in names if counts[n] == 0]
    if missing:
        raise ValueError(f"no gradient reached {missing[:3]} (and {max(0, len(missing) - 3)} more)")
    return {n: sums[n] / counts[n] for n in names}
