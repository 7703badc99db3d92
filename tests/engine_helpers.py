"""Builders for engine tests: tiny random Llama bases, perturbed experts, stores of their deltas."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from meswitch.compress.codec import encode_delta
from meswitch.store import DeltaStore, base_info, fingerprint_model

VOCAB = 49152  # the SmolLM2 tokenizer's


def perturbed(base, seed: int, rel: float = 0.05, norms: bool = True):
    """An 'expert': block weights (and norms) moved by Gaussian noise of ``rel`` times their std."""
    expert = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in expert.named_parameters():
            if "embed" in n or (not norms and "norm" in n):
                continue
            p.add_(torch.randn(p.shape, generator=g) * (p.std() if p.std() > 0 else 1.0) * rel)
    return expert


def expert_layers(base, expert, method: str = "lossless", bits: int = 2, k: int = 8):
    """Delta fields and meta of every changed parameter: ``lossless`` = dense float32 deltas."""
    b, e = base.state_dict(), expert.state_dict()
    linears = {n for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear)}
    layers, meta = {}, {}
    seen: set[int] = set()
    for name, t in e.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        d = t - b[name]
        if not torch.count_nonzero(d):
            continue
        owner = name.removesuffix(".weight")
        if method != "lossless" and owner in linears:
            layers[owner], meta[owner] = encode_delta(d, method, bits, k, torch.rand(d.shape[1]) + 0.5, True, 1.0)
        else:
            layers[name] = {"delta": d.clone()}
            meta[name] = {"method": "dense", "bits": 32, "shape": list(d.shape), "salient": 0}
    return layers, meta


def make_store(root: Path, base, experts: dict, method: str = "lossless", **kw) -> DeltaStore:
    store = DeltaStore.create(root, fingerprint_model(base), base_info(base))
    for name, expert in experts.items():
        layers, meta = expert_layers(base, expert, method, **kw)
        store.add_expert(name, layers, meta, {"method": method})
    return store


def tiny_base(seed: int = 0, layers: int = 2):
    """A tiny random Llama with the SmolLM2 vocabulary whose greedy output is not one repeated token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.15,
        eos_token_id=2, bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()
