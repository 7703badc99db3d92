import math

import torch

from meswitch.zoo.train import TrainConfig, finetune, lr_at
from tests.conftest import tiny_llama


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, batch_size=1, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, seed=0)
    assert math.isclose(lr_at(0, cfg), 1e-4)
    assert math.isclose(lr_at(9, cfg), 1e-3)
    assert math.isclose(lr_at(10, cfg), 1e-3)
    assert math.isclose(lr_at(60, cfg), 1e-3 * (0.1 + 0.9 * 0.5))
    assert math.isclose(lr_at(110, cfg), 1e-4)


def test_finetune_learns_and_changes_every_block_but_not_embeddings():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # an easy pattern: a short cycle of four tokens
    ids = torch.tensor([5, 17, 42, 99]).repeat(16, 9)[:, :33]
    mask = torch.ones_like(ids, dtype=torch.bool)
    cfg = TrainConfig(steps=12, batch_size=2, lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, seed=0)
    losses = finetune(model, ids, mask, cfg, desc="tiny")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    linear = [k for k in after if ".layers." in k and after[k].dim() == 2]
    assert len(linear) == 2 * 7
    for k in linear:
        assert not torch.equal(after[k], before[k]), k
    assert model.get_input_embeddings().weight.requires_grad  # restored for the caller
