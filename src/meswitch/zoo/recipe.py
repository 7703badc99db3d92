"""Zoo recipes: everything that determines a zoo's bytes, and a key that changes when any of it does."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Bump when the data pipeline or training loop changes in a way the fields below do not capture.
# 2: prompts repeated inside one source (chatterbot, ShareGPT) are drawn once, so no held-out
#    prompt also appears in training.
PIPELINE_VERSION = 2


@dataclass(frozen=True)
class ZooRecipe:
    """How to build a zoo. ``num_layers=None`` keeps every decoder block of the base."""

    size: str
    num_layers: int | None
    steps: int  # optimizer steps per expert
    batch_size: int  # blocks per step
    block_len: int  # tokens per block
    lr: float
    warmup_steps: int
    min_lr_ratio: float  # cosine decay floor, as a fraction of lr
    max_example_len: int  # tokens; longer examples are truncated
    n_train: int  # training examples drawn per domain
    n_test: int  # held-out examples saved per domain
    n_ppl: int  # held-out examples per domain scored in the perplexity table
    seed: int = 0
    min_gain: float = 0.15  # each expert must cut its own domain's perplexity by at least this much
    # (expert name, domain) in training order
    experts: tuple[tuple[str, str], ...] = field(default=(("general", "general"), ("math", "math"), ("code", "code")))
    pipeline_version: int = PIPELINE_VERSION

    def key(self) -> str:
        """A short hash of every field: a cache entry is reused only under the same key."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for _, d in self.experts))


RECIPES: dict[str, ZooRecipe] = {
    # The real thing: every layer, 150 steps of 4 x 256 tokens per expert.
    "full": ZooRecipe(
        size="full", num_layers=None, steps=150, batch_size=4, block_len=256, lr=5e-5, warmup_steps=10,
        min_lr_ratio=0.1, max_example_len=512, n_train=1500, n_test=200, n_ppl=32,
    ),
    # The same pipeline on the first 4 blocks, for tests: minutes, not an hour.
    "small": ZooRecipe(
        size="small", num_layers=4, steps=24, batch_size=4, block_len=128, lr=2e-4, warmup_steps=3,
        min_lr_ratio=0.1, max_example_len=256, n_train=160, n_test=48, n_ppl=12,
    ),
}


def get_recipe(size: str) -> ZooRecipe:
    try:
        return RECIPES[size]
    except KeyError:
        raise ValueError(f"unknown zoo size {size!r}; expected one of {sorted(RECIPES)}") from None
