"""Shared fixtures: tiny random Llama models (hidden 64) and the cached small zoo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 128):
    """A random LlamaForCausalLM, hidden 64, for fast unit tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def small_zoo() -> dict:
    """The small reference zoo, built (or reused from the cache) once per test session."""
    from meswitch.zoo.build import build_zoo

    return build_zoo("small")


@pytest.fixture(scope="session")
def smollm_tokenizer(small_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(small_zoo["paths"]["base"]))
