"""Token ids for training and evaluation: chat-template rendering, loss masks, packing.

Shapes: ``T`` tokens of one example, ``B`` blocks, ``L`` block length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from meswitch.data.examples import Example

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def render(example: Example, tokenizer: PreTrainedTokenizerBase, max_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of ``example`` and a loss mask, each of length T.

    With a response: the tokenizer's chat template over (user=text, assistant=response); the mask
    covers the assistant's tokens (its answer and end-of-turn), as in supervised fine-tuning.
    Without one: the raw text, every token but the first scored.
    """
    if example.response:
        # Render to text, then tokenize prompt and answer separately: that is how the model sees a
        # prompt at generation time (BPE may merge across the boundary when tokenized as one string).
        user = [{"role": "user", "content": example.text}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently inside the conversation")
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids = [*p_ids, *a_ids]
        mask = [False] * len(p_ids) + [True] * len(a_ids)
    else:
        ids = list(tokenizer(example.text)["input_ids"])
        mask = [False] + [True] * (len(ids) - 1)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def pack_blocks(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, block_len: int, max_example_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate rendered examples into blocks of ``block_len`` tokens, no padding.

    Returns ``ids: [B, L]`` (int64) and ``mask: [B, L]`` (bool, True where the token is a target).
    The tail that does not fill a whole block is dropped.
    """
    import torch

    ids: list[int] = []
    mask: list[bool] = []
    for e in examples:
        i, m = render(e, tokenizer, max_example_len)
        ids += i
        mask += m
    n = len(ids) // block_len
    if n == 0:
        raise ValueError(f"{len(examples)} examples give {len(ids)} tokens, fewer than one block of {block_len}")
    t_ids = torch.tensor(ids[: n * block_len], dtype=torch.long).view(n, block_len)
    t_mask = torch.tensor(mask[: n * block_len], dtype=torch.bool).view(n, block_len)
    return t_ids, t_mask


def padded_batches(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_len: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rendered examples as right-padded batches ``(ids [B, L], mask [B, L], attention_mask [B, L])``.

    Examples are sorted by length first (less padding); padding is neither attended to nor scored.
    """
    import torch

    rendered = sorted((render(e, tokenizer, max_len) for e in examples), key=lambda r: len(r[0]))
    for start in range(0, len(rendered), batch_size):
        chunk = rendered[start : start + batch_size]
        width = max(len(i) for i, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        attn = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (i, m) in enumerate(chunk):
            ids[row, : len(i)] = torch.tensor(i, dtype=torch.long)
            mask[row, : len(m)] = torch.tensor(m, dtype=torch.bool)
            attn[row, : len(i)] = 1
        yield ids, mask, attn
