"""Perplexity of a causal LM on labelled examples (the response tokens when there is a response)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from meswitch.data.chat import padded_batches
from meswitch.data.examples import Example
from meswitch.model.lm import masked_nll

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_len: int = 512,
    batch_size: int = 8,
) -> float:
    """exp(mean NLL per scored token) over ``examples``, each truncated to ``max_len`` tokens.

    Batches are right-padded; padding is neither attended to nor scored.
    """
    import torch

    if not examples:
        raise ValueError("perplexity needs at least one example")
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask, attn in padded_batches(examples, tokenizer, max_len, batch_size):
            nll, n = masked_nll(model, ids, mask, attn)
            total += float(nll)
            count += n
    if count == 0:
        raise ValueError("no scored tokens in the examples")
    return math.exp(total / count)
