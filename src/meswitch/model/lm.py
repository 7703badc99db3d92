"""Language-model loss on selected positions, without materialising logits for every token."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def masked_nll(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over the positions that ``mask`` marks as targets.

    ids: [B, L] token ids; mask: [B, L] bool, True where token t is scored (predicted from t-1);
    attention_mask: [B, L] or None. Returns (sum of NLL as a 0-d tensor, number of scored tokens).
    Only the scored positions go through the output head: at vocab 49k that head costs as much as
    several decoder blocks.
    """
    import torch.nn.functional as F

    hidden = model.get_decoder()(input_ids=ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    target = mask[:, 1:]
    h = hidden[:, :-1][target]  # [N, H]
    logits = model.get_output_embeddings()(h).float()  # [N, V]
    nll = F.cross_entropy(logits, ids[:, 1:][target], reduction="sum")
    return nll, int(target.sum())
