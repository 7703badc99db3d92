"""How faithfully a compressed expert reproduces the original: KL, top-1 agreement, perplexity ratio."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Fidelity:
    kl: float  # mean per-token KL(reference || candidate), nats
    top1: float  # share of scored tokens where both models' argmax agree
    ppl_ratio: float  # perplexity(candidate) / perplexity(reference) on the text's own next tokens
    tokens: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def reference_states(
    reference: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]]
) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor]]:
    """Run the reference once: ``(ids, mask, attn, hidden [N, H])`` per batch, ``hidden`` at scored positions.

    Comparing many candidates against one reference then costs one head projection each, not a forward.
    """
    out = []
    for ids, mask, attn in batches:
        hidden = reference.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        out.append((ids, mask, attn, hidden[:, :-1][mask[:, 1:]]))
    return out


@torch.no_grad()
def compare_to_states(
    states: list[tuple[Tensor, Tensor, Tensor | None, Tensor]], head: nn.Module, candidate: nn.Module,
    chunk: int = 64,
) -> Fidelity:
    """:func:`compare_models` against cached reference states; ``head`` is the reference's output layer.

    The ``[tokens, vocab]`` log-probabilities are taken ``chunk`` tokens at a time (memory).
    """
    kl_sum = agree = 0.0
    nll_ref = nll_cand = 0.0
    n = 0
    cand_head = candidate.get_output_embeddings()
    for ids, mask, attn, h_ref in states:
        hidden = candidate.get_decoder()(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        h_cand = hidden[:, :-1][mask[:, 1:]]
        targets = ids[:, 1:][mask[:, 1:]]
        for rows in torch.arange(len(targets)).split(chunk):
            lp_ref = F.log_softmax(head(h_ref[rows]).float(), dim=-1)
            lp_cand = F.log_softmax(cand_head(h_cand[rows]).float(), dim=-1)
            target = targets[rows]
            kl_sum += float((lp_ref.exp() * (lp_ref - lp_cand)).sum())
            agree += float((lp_ref.argmax(-1) == lp_cand.argmax(-1)).sum())
            nll_ref -= float(lp_ref.gather(1, target[:, None]).sum())
            nll_cand -= float(lp_cand.gather(1, target[:, None]).sum())
        n += int(targets.numel())
    if n == 0:
        raise ValueError("no scored tokens to compare")
    return Fidelity(kl=kl_sum / n, top1=agree / n, ppl_ratio=math.exp((nll_cand - nll_ref) / n), tokens=n)


def compare_models(
    reference: nn.Module, candidate: nn.Module, batches: Iterable[tuple[Tensor, Tensor, Tensor | None]]
) -> Fidelity:
    """Compare two causal LMs token by token.

    batches: ``(ids [B, L], mask [B, L] bool, attention_mask [B, L] or None)``; ``mask`` marks the
    tokens to score (each predicted from the previous position).
    """
    return compare_to_states(reference_states(reference, batches), reference.get_output_embeddings(), candidate)
