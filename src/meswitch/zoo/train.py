"""Full-parameter supervised fine-tuning of one expert (every block's linear layers and norms).

The token embeddings, tied to the output head in SmolLM2, stay frozen: experts then share them
with the base exactly, and a step costs less (no 28M-row embedding gradient or Adam state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meswitch.model.lm import masked_nll

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    seed: int
    max_grad_norm: float = 1.0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def finetune(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, cfg: TrainConfig, desc: str = "train"
) -> list[float]:
    """Train ``model`` in place on packed blocks; returns the loss of every step.

    ids, mask: [B, L] from ``pack_blocks``. Step s takes ``cfg.batch_size`` blocks from a seeded
    permutation, cycling when the data is shorter than ``steps * batch_size`` blocks.
    """
    import torch
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.cat([torch.randperm(len(ids), generator=gen) for _ in range(
        math.ceil(cfg.steps * cfg.batch_size / len(ids)))])
    model.get_input_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=True)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc=desc, unit="step", dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        nll, n = masked_nll(model, ids[batch], mask[batch])
        loss = nll / max(n, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    model.get_input_embeddings().weight.requires_grad_(True)
    return losses
