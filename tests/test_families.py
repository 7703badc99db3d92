"""Every supported model family served by the engine against its own transformers implementation.

Tiny random checkpoints (:func:`tests.engine_helpers.tiny_family`: 2 layers, hidden 64, GQA, vocabulary
256) with each family's variant switched on: Llama 3 rope scaling, sliding windows shorter than the
sequences (mistral, qwen2 with ``use_sliding_window``, gemma local layers, phi3), Gemma's offset norms,
embedding scale, ``query_pre_attn_scalar`` and soft-capping, Qwen3/Gemma3 q/k norms, Gemma3's local
rope, Phi-3's fused projections and partial rotary.
"""

from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch

from meswitch.compress.pipeline import compress_model
from meswitch.data.examples import Example
from meswitch.deltas.apply import apply_delta
from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.engine.backends import select
from meswitch.engine.errors import UnsupportedModelError
from meswitch.engine.families import SUPPORTED, FamilySpec
from meswitch.engine.model import ServingModel
from meswitch.store import DeltaStore, base_info, fingerprint_model
from tests.engine_helpers import (
    FAMILY_WINDOW,
    ByteTokenizer,
    hf_incremental_logits,
    hf_logits,
    make_store,
    perturbed,
    small_config,
    teacher_forced_logits,
    tiny_family,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen2_window", "qwen3", "gemma2", "gemma3_text", "phi3"]
WINDOWED = {"mistral", "qwen2_window", "qwen3", "gemma2", "gemma3_text", "phi3"}
PREFILL, LENGTH = 6, 13  # both longer than FAMILY_WINDOW: windows cut into prefill and decode


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory):
    base = tiny_family(request.param)
    experts = {"a": perturbed(base, 1), "b": perturbed(base, 2)}  # norms and biases moved too
    root = tmp_path_factory.mktemp(request.param)
    return SimpleNamespace(name=request.param, base=base, experts=experts, root=root,
                           lossless=make_store(root / "lossless", base, experts))


def _engine(store, base, **kw) -> Engine:
    return Engine(store, copy.deepcopy(base), ByteTokenizer(), EngineConfig(**{"backend": "reference", **kw}))


def _seqs(names, seed: int = 0) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, 256, (LENGTH,), generator=g).tolist() for n in names}


def test_every_weight_of_the_family_has_its_delta_target(fam):
    model = ServingModel(copy.deepcopy(fam.base), select("reference", "cpu").backend)
    linears, norms = dict(model.linears()), dict(model.norms())
    hf_linears = {n for n, m in fam.base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(linears) == hf_linears  # every linear is an ExpertLinear under its Hugging Face name
    for name in fam.base.state_dict():  # every other tensor takes per-expert dense deltas: norms and biases
        assert name.removesuffix(".weight") in linears or name in norms or name == "model.embed_tokens.weight", name
    if fam.name == "phi3":  # the fused projections stay one layer each: one stored delta each
        assert "model.layers.0.self_attn.qkv_proj" in linears and "model.layers.0.mlp.gate_up_proj" in linears
    if fam.name.startswith("gemma"):
        assert sum(n.startswith("model.layers.0.") for n in norms) == (6 if fam.name == "gemma3_text" else 4)


def test_engine_logits_equal_transformers_for_base_and_experts_in_one_mixed_batch(fam):
    eng = _engine(fam.lossless, fam.base)
    seqs = _seqs(["a", "base", "b"])
    got = teacher_forced_logits(eng, seqs, prefill=PREFILL)  # one mixed batch: prefill, then decode steps
    for name, ids in seqs.items():
        model = fam.base if name == "base" else fam.experts[name]
        want = hf_logits(model, ids, PREFILL)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"{fam.name}, expert {name}")
    # and the experts really differ from the base
    assert (got["a"] - got["base"]).abs().max() > 1e-3
    if fam.name in WINDOWED:  # the window matters: without it transformers computes something else
        unwindowed = copy.deepcopy(fam.base)
        unwindowed.config.sliding_window = 10 * LENGTH
        full = hf_logits(unwindowed, seqs["base"], PREFILL)
        assert (full - got["base"]).abs().max() > 1e-3


def test_mixed_batch_greedy_equals_each_request_alone(fam):
    eng = _engine(fam.lossless, fam.base)
    prompts = ["Hello there, how are", "def add(a, b):", "What is 7 times 6?", "The weather"]
    experts, lengths = ["a", None, "b", "a"], [7, 3, 6, 1]  # sequences leave the batch at different steps
    reqs = [Request(prompt=p, expert=e, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, e, n in zip(prompts, experts, lengths, strict=True)]
    together = eng.generate(reqs)
    alone = _engine(fam.lossless, fam.base)
    for r, got in zip(reqs, together, strict=True):
        assert got.token_ids == alone.generate([Request(prompt=r.prompt, expert=r.expert, params=r.params)])[0].token_ids
        assert len(got.token_ids) == r.params.max_tokens


def test_quantized_deltas_match_transformers_with_the_applied_deltas(fam):
    store = make_store(fam.root / "salient", fam.base, fam.experts, method="salient", bits=2, k=8)
    eng = _engine(store, fam.base)
    seqs = _seqs(["b", "base", "a"], seed=1)
    got = teacher_forced_logits(eng, seqs, prefill=PREFILL)
    for name in ("a", "b"):
        layers, entry = store.load_expert(name)
        want = hf_logits(apply_delta(copy.deepcopy(fam.base), layers, entry["layers"]), seqs[name], PREFILL)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"{fam.name}, expert {name}")


def test_greedy_decoding_equals_transformers_generate_with_the_dequantized_weights(fam):
    """Greedy tokens of quantized experts and the base, decoded together in one engine batch, equal
    transformers' ``generate`` on the base with each expert's stored deltas applied."""
    store = make_store(fam.root / "greedy", fam.base, fam.experts, method="salient", bits=2, k=8)
    prompts = {"a": "def add(a, b):", "base": "The weather", "b": "What is 7 times 6?"}
    steps = 2 * LENGTH  # past every window
    reqs = [Request(prompt=p, expert=None if e == "base" else e,
                    params=SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True))
            for e, p in prompts.items()]
    got = _engine(store, fam.base).generate(reqs)
    for (name, prompt), completion in zip(prompts.items(), got, strict=True):
        model = copy.deepcopy(fam.base)
        if name != "base":
            layers, entry = store.load_expert(name)
            apply_delta(model, layers, entry["layers"])
        ids = torch.tensor([list(prompt.encode())])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
        eos = model.config.eos_token_id
        if eos in want:  # transformers stops there; the engine ignores EOS (and must agree up to it)
            want = want[: want.index(eos) + 1]
        assert completion.token_ids[: len(want)] == want, f"{fam.name}, {name}"
        assert len(want) >= 8, "too few tokens compared"


def test_compress_model_encodes_every_linear_and_the_engine_serves_the_result(fam):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "code", "x", "=", "1", "2", "+"]
    calib = [Example(" ".join(rng.choice(words) for _ in range(40)), "text") for _ in range(40)]
    compressed = copy.deepcopy(fam.base)  # ends as base + the deltas as stored
    layers, meta, _ = compress_model(compressed, fam.experts["a"], ByteTokenizer(), calib,
                                     small_config(method="salient", bits=2))
    quantized = {n for n, m in meta.items() if m["method"] != "dense"}
    served = ServingModel(copy.deepcopy(fam.base), select("reference", "cpu").backend)
    assert quantized == {n for n, _ in served.linears() if n != "lm_head"}
    store = DeltaStore.create(fam.root / "compressed", fingerprint_model(fam.base), base_info(fam.base))
    store.add_expert("a", layers, meta, {"method": "salient"})
    seqs = _seqs(["a", "base"], seed=2)
    got = teacher_forced_logits(_engine(store, fam.base), seqs, prefill=PREFILL)
    torch.testing.assert_close(got["a"], hf_logits(compressed, seqs["a"], PREFILL), atol=1e-4, rtol=0)


def test_family_specs_read_windows_and_variants_from_the_config():
    specs = {f: FamilySpec.from_config(tiny_family(f).config) for f in FAMILIES}
    w = FAMILY_WINDOW
    assert specs["llama"].windows == specs["qwen2"].windows == (None, None)  # qwen2: use_sliding_window false
    assert specs["mistral"].windows == specs["phi3"].windows == (w, w)
    assert specs["qwen2_window"].windows == specs["qwen3"].windows == (None, w)  # from layer max_window_layers = 1
    assert specs["gemma2"].windows == specs["gemma3_text"].windows == (w, None)  # local, then global
    assert specs["gemma2"].attn_softcap == 2.0 and specs["gemma3_text"].attn_softcap is None
    assert specs["gemma3_text"].rope_keys == ("sliding_attention", "full_attention")
    assert specs["gemma2"].attn_scale == 24**-0.5 and specs["llama"].attn_scale == 16**-0.5
    assert specs["phi3"].fused and specs["qwen3"].qk_norm and not specs["qwen2"].qk_norm


def test_an_unsupported_family_is_refused_naming_the_supported_ones():
    backend = select("reference", "cpu").backend
    gpt2 = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(UnsupportedModelError, match="this base is 'gpt2'") as err:
        ServingModel(gpt2, backend)
    assert all(f in str(err.value) for f in SUPPORTED)
    from transformers import LlamaConfig

    dynamic = LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="rope_type 'dynamic'"):
        ServingModel(SimpleNamespace(config=dynamic), backend)



def test_longrope_follows_transformers_cached_decoding_sequence_by_sequence(tmp_path):
    """Phi-3's longrope picks short or long factors by the last position of a forward; the engine runs the
    rope per sequence, so each sequence of a mixed batch gets what transformers' cached decoding of it alone gets."""
    base = tiny_family("phi3_longrope")  # long factors from position 8 on: crossed by prefill and decode below
    assert FamilySpec.from_config(base.config).rope_per_sequence
    experts = {"a": perturbed(base, 1)}
    store = make_store(tmp_path / "s", base, experts)
    seqs = _seqs(["a", "base"], seed=3)
    got = teacher_forced_logits(_engine(store, base), seqs, prefill=PREFILL)
    for name, ids in seqs.items():
        want = hf_incremental_logits(base if name == "base" else experts[name], ids, PREFILL)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"expert {name}")
    eng, alone = _engine(store, base), _engine(store, base)
    reqs = [Request(prompt=p, expert=e, params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for p, e, n in [("Hi", "a", 9), ("A longer prompt than 8", None, 4), ("Four", "a", 6)]]
    for r, got_r in zip(reqs, eng.generate(reqs), strict=True):  # positions on both sides of 8 in one step
        assert got_r.token_ids == alone.generate([Request(prompt=r.prompt, expert=r.expert,
                                                          params=r.params)])[0].token_ids
