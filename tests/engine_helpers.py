"""Builders for engine, front and server tests: tiny random Llama bases, perturbed experts, stores of
their deltas, and a keyword router that stands in for ``meswitch.router``."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from meswitch.compress.codec import encode_delta
from meswitch.engine.model import SeqSlice, StepBatch
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


EXPERTS = ("math", "code", "general")  # the zoo's expert names


def build_tiny(root: Path):
    """A tiny base and a lossless store (under ``root``) of three perturbed experts named like the zoo's."""
    base = tiny_base()
    experts = {name: perturbed(base, i + 1) for i, name in enumerate(EXPERTS)}
    return base, make_store(root / "store", base, experts)


def make_engine(tiny, tok, **kw):
    """An engine over ``tiny`` (``build_tiny``'s pair) with a fresh copy of its base; ``kw``: EngineConfig fields."""
    from meswitch.engine import Engine, EngineConfig

    base, store = tiny
    return Engine(store, copy.deepcopy(base), tok, EngineConfig(**kw))


@dataclass(frozen=True)
class Decision:
    expert: str
    domain: str
    confidence: float
    fallback: bool
    top_k: tuple = ()


class KeywordRouter:
    """Stands in for ``meswitch.router``: digits -> math, 'def' -> code, else general (fixed confidences).

    ``seen``: every text it classified, with the name of the thread that asked.
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def route(self, texts: list[str]) -> list[Decision]:
        out = []
        for t in texts:
            self.seen.append((t, threading.current_thread().name))
            if any(ch.isdigit() for ch in t):
                out.append(Decision("math", "math", 0.875, False))
            elif "def " in t:
                out.append(Decision("code", "code", 0.75, False))
            else:
                out.append(Decision("general", "general", 0.5, True))
        return out


def teacher_forced_logits(engine, seqs: dict[str, list[int]], prefill: int) -> dict[str, torch.Tensor]:
    """Run every sequence in one batch: prefill ``prefill`` tokens, then decode the rest one token per step.

    Returns ``{expert: [len - prefill + 1, V]}``: the logits after each step (a mixed batch every step).
    """
    names = list(seqs)
    idx = {n: (-1 if n == "base" else engine.pool.lookup(n)) for n in names}
    for n in names:
        if idx[n] >= 0:
            engine.pool.acquire(idx[n])
    cache = engine.model.new_cache(len(names), 64)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    first = [SeqSlice(i, 0, prefill, idx[n]) for i, n in enumerate(names)]
    ids = torch.tensor([t for n in names for t in seqs[n][:prefill]])
    logits = engine.model(ids, StepBatch.build(first), cache)
    for i, n in enumerate(names):
        out[n].append(logits[i])
    for pos in range(prefill, len(next(iter(seqs.values())))):
        step = [SeqSlice(i, pos, 1, idx[n]) for i, n in enumerate(names)]
        logits = engine.model(torch.tensor([seqs[n][pos] for n in names]), StepBatch.build(step), cache)
        for i, n in enumerate(names):
            out[n].append(logits[i])
    return {n: torch.stack(v) for n, v in out.items()}


def hf_logits(model, ids: list[int], prefill: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, prefill - 1 :]


def small_config(**kw):
    """A compression config sized for tiny models: 4 calibration blocks of 128 tokens, 2 held out."""
    from meswitch.compress.config import CompressConfig

    return CompressConfig(calib_blocks=4, eval_blocks=2, calib_len=128, **kw)


class ByteTokenizer:
    """Stands in for the tokenizer of a 256-token model: one token per UTF-8 byte, no special tokens."""

    eos_token_id = None

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


FAMILY_WINDOW = 4  # the sliding window of the tiny windowed families: shorter than the test sequences


def tiny_family(family: str, seed: int = 0, vocab: int = 256):
    """A tiny random causal LM of a Hugging Face family: 2 layers, hidden 64, 4 query and 2 key-value heads.

    ``family``: a ``model_type`` (``gemma3_text`` included), ``qwen2_window`` (qwen2 with
    ``use_sliding_window`` on its second layer, as qwen3 has) or ``phi3_longrope`` (long factors past
    position 8). Each family's variant is switched on: Llama 3 rope
    scaling and biases on every linear layer, sliding windows of :data:`FAMILY_WINDOW`, Gemma soft-capping and ``query_pre_attn_scalar``,
    Phi-3 partial rotary.
    """
    import transformers as tf

    common = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
              "initializer_range": 0.1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    w = FAMILY_WINDOW
    gemma = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": w, "final_logit_softcapping": 5.0,
             "layer_types": ["sliding_attention", "full_attention"]}
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    families = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": llama3, "tie_word_embeddings": True,
                                                         "attention_bias": True, "mlp_bias": True}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": w}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": False, "sliding_window": w}),
        "qwen2_window": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": w,
                                                               "max_window_layers": 1}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16, "use_sliding_window": True,
                                                        "sliding_window": w, "max_window_layers": 1}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {**gemma, "attn_logit_softcapping": 2.0}),
        "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, gemma),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"sliding_window": w, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
        "phi3_longrope": (tf.Phi3Config, tf.Phi3ForCausalLM, {"original_max_position_embeddings": 8, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0]}}),
    }
    config_cls, model_cls, extra = families[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**common, **extra})).eval()


def hf_incremental_logits(model, ids: list[int], prefill: int) -> torch.Tensor:
    """transformers' own cached decoding: prefill ``prefill`` tokens, then one token per forward;
    ``[len - prefill + 1, V]``, the logits after each (what ``teacher_forced_logits`` compares to)."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:prefill]]), use_cache=True)
        logits = [out.logits[0, -1]]
        for p in range(prefill, len(ids)):
            out = model(torch.tensor([[ids[p]]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)
