"""Tune step sizes by distillation: codes frozen, scales (and zeros) moved so the compressed expert's
next-token distributions match the full expert's (KL on calibration text).

Each tuned layer's weight is ``W_base + dequantize(codes, scale0 * exp(g), zero0 + scale0 * z)`` with
learnable ``g`` and ``z`` (scale-free parametrisation: one learning rate fits every layer).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from meswitch.compress.blocks import checkpointed_blocks
from meswitch.deltas import DeltaFormatError, QuantizedDelta, decode, dequantize, sign2d_dequantize, unpack
from meswitch.utils.memory import trim_heap

KL_CHUNK = 64  # tokens whose [chunk, vocab] log-probabilities are alive at once in the distillation loss


class LearnableDelta(nn.Module):
    """A quantized delta ``[out, in]`` whose grid is trainable; salient columns stay fixed."""

    def __init__(self, fields: dict[str, Tensor], meta: dict[str, Any]):
        super().__init__()
        d = decode(fields, meta)
        if not isinstance(d, QuantizedDelta):
            raise DeltaFormatError(f"only quantized deltas have a grid to tune, got method {meta.get('method')!r}")
        self.bits, self.shape = d.bits, d.shape
        scale, zero, col = d.scale.float(), d.zero, d.col_scale
        sal_idx, sal_cols, rest = d.salient_idx, d.columns().float(), d.rest_idx
        # the codes stay packed (1-4 bits, not a byte each): unpacked per layer in forward, which the
        # gradient pass recomputes (checkpoint), so one matrix's codes are unpacked at a time
        self.register_buffer("packed", fields["codes"], persistent=False)
        self.register_buffer("scale0", scale, persistent=False)
        self.register_buffer("zero0", zero, persistent=False)
        self.register_buffer("rest_idx", rest, persistent=False)
        self.register_buffer("salient_idx", sal_idx, persistent=False)
        self.register_buffer("salient_cols", sal_cols, persistent=False)
        self.register_buffer("col0", col, persistent=False)
        self.log_gain = nn.Parameter(torch.zeros_like(scale))
        self.zero_shift = nn.Parameter(torch.zeros_like(zero)) if zero is not None else None
        self.col_log_gain = nn.Parameter(torch.zeros_like(col)) if col is not None else None

    @property
    def codes(self) -> Tensor:
        """``uint8 [out, in - k]``: the frozen codes of the non-salient columns."""
        return unpack(self.packed, self.bits, len(self.rest_idx))

    def grid(self) -> tuple[Tensor, Tensor | None]:
        scale = self.scale0 * self.log_gain.exp()
        zero = None if self.zero0 is None else self.zero0 + self.scale0 * self.zero_shift
        return scale, zero

    def col_scale(self) -> Tensor | None:
        return None if self.col0 is None else self.col0 * self.col_log_gain.exp()

    def forward(self) -> Tensor:
        """``[out, in]`` float32 delta."""
        scale, zero = self.grid()
        if self.col0 is not None:
            rest = sign2d_dequantize(self.codes, scale, self.col_scale())
        else:
            rest = dequantize(self.codes, scale, zero, self.bits)
        full = rest.new_zeros(self.shape).index_copy(1, self.rest_idx, rest)
        return full.index_copy(1, self.salient_idx, self.salient_cols)


class DeltaLinear(nn.Module):
    """``y = x W_base^T + x delta^T``: a base linear layer plus a learnable quantized delta.

    The dense delta is rebuilt in the backward pass (activation checkpointing) instead of being kept
    for it: one layer's ``[out, in]`` at a time instead of a copy of every weight of the model
    (measured: distillation raised peak memory by ~2.5 GB on the 135M zoo without this).
    """

    def __init__(self, base: nn.Linear, delta: LearnableDelta):
        super().__init__()
        self.base = base  # kept whole, so :func:`detach` can put it back
        self.delta = delta

    def _delta_out(self, x: Tensor) -> Tensor:
        return F.linear(x, self.delta())

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        if not torch.is_grad_enabled():
            return y + self._delta_out(x)
        return y + checkpoint(self._delta_out, x, use_reentrant=False)


def attach(model: nn.Module, layers: dict[str, dict[str, Tensor]], meta: dict[str, dict[str, Any]]) -> list[str]:
    """Replace each quantized linear of ``model`` (in place) by a DeltaLinear; returns their names."""
    names = []
    for name, m in meta.items():
        if m["method"] == "dense":
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, DeltaLinear(getattr(parent, child), LearnableDelta(layers[name], m)))
        names.append(name)
    return names


def detach(model: nn.Module, names: list[str]) -> None:
    """Undo :func:`attach`: put the original linear layers back (their weights were never changed)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, getattr(parent, child).base)


def tune_grids(
    student: nn.Module,
    teacher: nn.Module,
    layers: dict[str, dict[str, Tensor]],
    meta: dict[str, dict[str, Any]],
    blocks: Tensor,
    masks: Tensor,
    steps: int,
    lr: float,
) -> list[float]:
    """Distil every quantized layer's grid (see module docstring); ``layers`` get the tuned scales.

    ``student`` is the base with any dense deltas already applied; it is returned to that state.
    """
    names = attach(student, layers, meta)
    try:
        losses = distill(student, teacher, blocks, masks, steps, lr)
        for n in names:
            layers[n] = export_grid(student.get_submodule(n).delta, layers[n])
    finally:
        detach(student, names)
    return losses


def kl_backward(h_student: Tensor, h_teacher: Tensor, head_student: nn.Module, head_teacher: nn.Module,
                chunk: int = KL_CHUNK) -> float:
    """Mean per-token ``KL(teacher || student)`` of the next-token distributions, backpropagated into
    ``h_student``'s graph; returns the loss.

    h_student: ``[N, H]`` final hidden states (with a graph), h_teacher: ``[N, H]`` (none); the heads
    map them to ``[N, V]`` logits. Computed ``chunk`` tokens at a time (the gradient of one token's
    KL involves only its own row), so ``[chunk, V]`` log-probabilities are alive, not ``[N, V]``.
    """
    n = h_student.shape[0]
    leaf = h_student.detach().requires_grad_()
    total = 0.0
    for rows in torch.arange(n).split(chunk):
        with torch.no_grad():
            lp_t = F.log_softmax(head_teacher(h_teacher[rows]).float(), -1)
        lp_s = F.log_softmax(head_student(leaf[rows]).float(), -1)
        part = F.kl_div(lp_s, lp_t, log_target=True, reduction="sum") / n
        part.backward()
        total += part.item()
    h_student.backward(leaf.grad)
    return total


def distill(
    student: nn.Module,
    teacher: nn.Module,
    blocks: Tensor,
    masks: Tensor,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 2,
    desc: str = "distill",
    checkpoint_blocks: bool = True,
) -> list[float]:
    """Minimise mean per-token KL(teacher || student) over the student's grid parameters.

    blocks, masks: ``[B, L]`` calibration ids and the positions to score (blocks with none are skipped: their
    KL would be a mean over nothing). checkpoint_blocks: recompute
    each decoder block's activations in backward (:func:`checkpointed_blocks`; same gradients, less
    memory, slower). Returns per-step losses.
    """
    from tqdm.auto import tqdm

    params = [p for n, p in student.named_parameters() if "log_gain" in n or "zero_shift" in n]  # incl. col_log_gain
    if not params:
        raise ValueError("the student has no DeltaLinear layers to tune (call attach first)")
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    keep = masks[:, 1:].any(dim=1)  # a block with no target token (a long prompt, say) has no KL to take
    if not keep.any():
        raise ValueError(f"none of the {len(blocks)} calibration blocks has a token to score")
    blocks, masks = blocks[keep], masks[keep]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", dynamic_ncols=True)
    with checkpointed_blocks(student) if checkpoint_blocks else nullcontext():
        for step in bar:
            i = (step * batch_size) % len(blocks)
            ids, mask = blocks[i : i + batch_size], masks[i : i + batch_size]
            sel = mask[:, 1:]
            with torch.no_grad():
                h_t = teacher.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][sel]
            h_s = student.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, :-1][sel]
            losses.append(kl_backward(h_s, h_t, student.get_output_embeddings(), teacher.get_output_embeddings()))
            del h_s, h_t
            opt.step()
            opt.zero_grad(set_to_none=True)
            trim_heap()  # a step's many sub-MiB tensors (unpacked codes) would otherwise pile up in the heap
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    return losses


def export_grid(delta: LearnableDelta, fields: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fields`` with the tuned scale (and zero) written back as float16."""
    scale, zero = delta.grid()
    out = dict(fields)
    out["scale"] = scale.detach().to(torch.float16)
    if zero is not None:
        out["zero"] = zero.detach().to(torch.float16)
    col = delta.col_scale()
    if col is not None:
        out["col_scale"] = col.detach().to(torch.float16)
    return out
