"""The base served from its GGUF blocks (``EngineConfig.base_weights``, :mod:`meswitch.engine.base_blocks`).

Claims, each against transformers or a statement independent of the code under test: the engine on the
packaged SmolLM2 base served from its Q4_1 / Q8_0 blocks gives transformers' logits on the dequantized
checkpoint (max abs diff <= 1e-4, the issue's bound), prefill and cached decode, base and experts mixed;
it holds the blocks' bytes, not float32; a layer whose weight is not the file's (a fine-tuned base), a
type with no kernel, and a file that is not the base's stay dense and say so; ``"gguf"`` refuses what
``"auto"`` falls back from, naming why; the directory reader refuses truncated and foreign files.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from meswitch.engine.base_blocks import BaseWeightsError, BlockEmbedding, BlockLinear, attach_gguf_base
from meswitch.engine.engine import Engine, EngineConfig
from meswitch.engine.kernels import ggml_cpu
from meswitch.engine.model import ServingModel
from meswitch.engine.request import Request
from meswitch.engine.sampling import SamplingParams
from meswitch.model.checkpoint import load_checkpoint, packaged_gguf_path
from meswitch.model.gguf_index import GGUFIndexError, read_index
from tests.engine_helpers import hf_incremental_logits, make_store, perturbed, teacher_forced_logits

pytestmark = pytest.mark.skipif(not ggml_cpu.available(), reason=f"no GGML kernel build: {ggml_cpu.unavailable_reason()}")

PROMPT = "Question: what is the capital of France? Answer step by step, then give one word."


@pytest.fixture(scope="module")
def small_base(small_zoo):
    """The small zoo's base: the packaged SmolLM2 GGUF dequantized, truncated to its first layers."""
    return load_checkpoint(Path(small_zoo["paths"]["base"]))


def serving(model, mode="auto", gguf=None) -> tuple[ServingModel, object]:
    from meswitch.engine.backends import select

    sm = ServingModel(model, select("pytorch", torch.device("cpu")).backend)
    return sm, attach_gguf_base(sm, mode, gguf)


def test_every_linear_and_the_embedding_of_the_packaged_base_are_served_from_blocks(small_base):
    model, _ = small_base
    sm, report = serving(model, "gguf")
    assert report.source == str(packaged_gguf_path()) and not report.dense and not report.notes
    n_linear = sum(1 for _ in sm.linears())
    assert len(report.tensors) == n_linear + 1  # + the embedding
    assert all(isinstance(lin.base, BlockLinear) for _, lin in sm.linears())
    assert isinstance(sm.embed.base, BlockEmbedding)
    assert set(report.tensors.values()) == {"Q4_1", "Q8_0"}
    # q/k/v and gate/up still run as one stacked call, now over stacked blocks
    layer = sm.layers[0]
    assert layer.qkv.blocks is not None and layer.qkv._stacked() and layer.gate_up._stacked()
    # bytes: the blocks (5 bits a Q4_1 weight, 8.5 a Q8_0 one; tied head and embedding once) + the norms
    params = {n: p for n, p in model.named_parameters()}
    linear_w = sum(p.numel() for n, p in params.items() if n.endswith("_proj.weight"))
    embed = params["model.embed_tokens.weight"].numel()
    norms = sum(p.numel() for n, p in params.items() if "norm" in n)
    assert report.bytes == linear_w * 20 // 32 + embed * 34 // 32 + norms * 4
    assert report.dense_bytes == (linear_w + embed + norms) * 4


def test_served_logits_are_transformers_on_the_dequantized_weights(small_base, tmp_path):
    model, tok = small_base
    ids = tok(PROMPT)["input_ids"]
    want = hf_incremental_logits(model, ids, prefill=len(ids) - 6)  # [7, V]: the prefill's last + 6 decodes
    engine = engine_on(model, tok, "gguf", make_store(tmp_path / "store", model, {}))
    got = teacher_forced_logits(engine, {"base": ids}, prefill=len(ids) - 6)["base"]
    assert engine.base_weights.tensors
    assert (got - want).abs().max().item() <= 1e-4


def engine_on(model, tok, mode, store, max_merged=0):
    return Engine(store, model, tok, EngineConfig(base_weights=mode, backend="pytorch", max_merged=max_merged))


def test_experts_mixed_with_the_base_get_the_same_tokens_and_logprobs_as_dense(small_base, tmp_path):
    """Experts' deltas were computed against the dequantized weights: on the blocks, a mixed batch of the
    base and two experts decodes the same greedy tokens, with log-probabilities within 1e-4."""
    model, tok = small_base
    experts = {"a": perturbed(model, 1, rel=0.02), "b": perturbed(model, 2, rel=0.02)}
    store = make_store(tmp_path / "store", model, experts)
    reqs = lambda: [Request(prompt=PROMPT, expert=e, params=SamplingParams(max_tokens=8, temperature=0, logprobs=0))  # noqa: E731
                    for e in (None, "a", "b", "a")]
    outs = {}
    for mode in ("dense", "gguf"):
        engine = engine_on(copy.deepcopy(model), tok, mode, store)
        outs[mode] = engine.generate(reqs())
    for d, g in zip(outs["dense"], outs["gguf"], strict=True):
        assert d.token_ids == g.token_ids
        diff = max(abs(x.logprob - y.logprob) for x, y in zip(d.logprobs, g.logprobs, strict=True))
        assert diff <= 1e-4


def test_a_merged_expert_adds_its_delta_to_the_dequantized_blocks(small_base, tmp_path):
    model, tok = small_base
    store = make_store(tmp_path / "store", model, {"a": perturbed(model, 1, rel=0.02)})
    engine = engine_on(model, tok, "gguf", store, max_merged=1)
    engine.pool.pin("a")
    engine.pool.merge(0)
    layer = engine.model.layers[0].q
    want = model.model.layers[0].self_attn.q_proj.weight.detach() + layer.deltas[0].dequantize()
    assert torch.equal(layer.merged[0], want)


def test_a_fine_tuned_layer_stays_dense_and_the_report_says_why(small_base):
    model, _ = small_base
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    sm, report = serving(tuned, "auto")
    name = "model.layers.1.mlp.up_proj.weight"
    assert name in report.dense and name not in report.tensors
    assert any(name in n and "differs" in n for n in report.notes)
    assert isinstance(sm.layers[1].up.base, torch.nn.Linear)
    assert isinstance(sm.layers[1].gate.base, BlockLinear)
    assert not sm.layers[1].gate_up._stacked()  # mixed kinds: the two layers run one by one
    assert sm.layers[0].gate_up._stacked()


def test_dense_mode_leaves_the_model_as_loaded(small_base):
    model, _ = small_base
    sm, report = serving(model, "dense")
    assert not report.tensors and report.bytes == report.dense_bytes
    assert all(isinstance(lin.base, torch.nn.Linear) for _, lin in sm.linears())


def test_a_base_the_file_does_not_describe_stays_dense_in_auto_and_is_refused_in_gguf(tiny_random_llama):
    sm, report = serving(tiny_random_llama, "auto")
    assert not report.tensors and "hidden size" in report.notes[0]
    with pytest.raises(BaseWeightsError, match="hidden size 576 .* of 64"):
        serving(tiny_random_llama, "gguf")
    with pytest.raises(BaseWeightsError, match="bfloat16 on cpu"):
        serving(copy.deepcopy(tiny_random_llama).to(torch.bfloat16), "gguf")
    with pytest.raises(BaseWeightsError, match="must be one of"):
        serving(tiny_random_llama, "q4")


@pytest.fixture
def tiny_random_llama():
    from tests.conftest import tiny_llama

    return tiny_llama()


# ---- a GGUF written here: another base, types without a kernel --------------------------------------------


def tiny_llama_256(seed: int = 0):
    """A tiny random Llama whose rows hold whole Q4_K blocks (hidden 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.1)
    return LlamaForCausalLM(cfg).eval()


def as_stored(w: torch.Tensor, type: str) -> tuple[np.ndarray, torch.Tensor]:
    """gguf-py's blocks of ``w: [out, in]`` in ``type`` and the float32 weight they hold."""
    import gguf

    blocks = gguf.quants.quantize(w.detach().numpy(), gguf.GGMLQuantizationType[type])
    held = ggml_cpu.reference_dequantize(torch.from_numpy(blocks.copy()).view(torch.uint8).reshape(w.shape[0], -1),
                                         type, w.shape[0])
    return blocks, held


def quantized_copy(model, path: Path) -> dict[str, str]:
    """Write a GGUF of ``model`` (a tiny llama, tied head) with q/k/o in Q4_1 (q/k rope-permuted as llama.cpp
    stores them), gate in raw Q4_K bytes (no kernel), the embedding in Q8_0, v/up/down left out, and set
    the model's weights to what the file holds. Returns the type each served Hugging Face name should get."""
    import gguf

    from tests.test_ggml_kernels import llama_cpp_permute

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # an array the index reader must skip
    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    want: dict[str, str] = {}
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            a = layer.self_attn
            for gname, short, mod, heads in (("attn_q", "q", a.q_proj, cfg.num_attention_heads),
                                             ("attn_k", "k", a.k_proj, cfg.num_key_value_heads),
                                             ("attn_output", "o", a.o_proj, 0)):
                blocks, held = as_stored(mod.weight, "Q4_1")
                mod.weight.copy_(held)
                stored = gguf.quants.quantize(llama_cpp_permute(held.numpy(), heads) if heads else held.numpy(), q4_1)
                w.add_tensor(f"blk.{i}.{gname}.weight", stored, raw_dtype=q4_1)
                want[f"model.layers.{i}.self_attn.{short}_proj.weight"] = "Q4_1"
            out, n = layer.mlp.gate_proj.weight.shape
            q4_k = rng.integers(0, 256, (out, n // 256 * 144), dtype=np.uint8)
            q4_k[:, 0:4] = np.full((out, 2), 0.01, dtype=np.float16).view(np.uint8)
            w.add_tensor(f"blk.{i}.ffn_gate.weight", q4_k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        emb = model.model.embed_tokens.weight
        blocks, held = as_stored(emb, "Q8_0")
        emb.copy_(held)
        w.add_tensor("token_embd.weight", blocks, raw_dtype=q8_0)
    want["model.embed_tokens.weight"] = want["lm_head.weight"] = "Q8_0"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return want


def test_a_gguf_of_another_base_serves_what_it_holds_and_names_what_it_cannot(tmp_path):
    model = tiny_llama_256()
    path = tmp_path / "tiny.gguf"
    want = quantized_copy(model, path)
    ids = list(range(3, 40))
    ref = hf_incremental_logits(model, ids, prefill=30)
    sm, report = serving(model, "gguf", path)
    assert report.tensors == want
    assert any("gate_proj" in n and "Q4_K has no kernel" in n for n in report.notes)
    assert any("v_proj" in n and "not in tiny.gguf" in n for n in report.notes)
    from meswitch.engine.model import SeqSlice, StepBatch

    cache = sm.new_cache(1, 64)
    got = [sm(torch.tensor(ids[:30]), StepBatch.build([SeqSlice(0, 0, 30, -1)]), cache)[0]]
    for p in range(30, len(ids)):
        got.append(sm(torch.tensor([ids[p]]), StepBatch.build([SeqSlice(0, p, 1, -1)]), cache)[0])
    assert (torch.stack(got) - ref).abs().max().item() <= 1e-4


# ---- the directory reader -----------------------------------------------------------------------------


def test_the_index_reads_the_packaged_directory_without_its_vocabulary():
    idx = read_index(packaged_gguf_path())
    assert idx.field("general.architecture") == "llama" and idx.field("llama.block_count") == 30
    assert "tokenizer.ggml.tokens" not in idx.metadata  # an array: skipped
    t = idx.tensors["blk.0.attn_q.weight"]
    assert (t.shape, t.type, t.nbytes) == ((576, 576), "Q4_1", 576 * 576 // 32 * 20)


def test_truncated_and_foreign_files_are_refused_by_name(tmp_path):
    data = packaged_gguf_path().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFIndexError, match="truncated"):
        read_index(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:1000])
    with pytest.raises(GGUFIndexError, match="cut short"):
        read_index(head)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(GGUFIndexError, match="no 'GGUF' magic"):
        read_index(other)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFIndexError, match="empty"):
        read_index(tmp_path / "empty.gguf")


def test_auto_falls_back_on_a_broken_file_and_gguf_refuses_it(small_base, tmp_path):
    model, _ = small_base
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(packaged_gguf_path().read_bytes()[:5000])
    sm, report = serving(model, "auto", cut)
    assert not report.tensors and "not a readable GGUF file" in report.notes[0]
    with pytest.raises(BaseWeightsError, match="cut.gguf"):
        serving(model, "gguf", cut)
    with pytest.raises(BaseWeightsError, match="no such GGUF file"):
        serving(model, "gguf", tmp_path / "missing.gguf")


def test_inspect_predicts_the_bytes_the_engine_then_holds(small_zoo, small_base):
    """``served_bytes`` reads names and shapes only; the engine checks values and counts its tensors."""
    from meswitch.model.gguf_blocks import served_bytes

    predicted = served_bytes(Path(small_zoo["paths"]["base"]), packaged_gguf_path())
    _, report = serving(small_base[0], "gguf")
    assert predicted == {"dense": report.dense_bytes, "served": report.bytes}


def test_an_expert_alone_is_not_merged_over_a_block_base_and_is_over_a_dense_one(small_base, tmp_path):
    """Merging writes a float32 copy of the weights: slower to read than the blocks plus the delta."""
    model, tok = small_base
    store = make_store(tmp_path / "store", model, {"a": perturbed(model, 1, rel=0.02)})
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for mode, merges in (("gguf", False), ("dense", True)):
        engine = Engine(store, copy.deepcopy(model), tok,
                        EngineConfig(base_weights=mode, backend="pytorch", max_merged=1, merge_after=2))
        engine.generate(Request(prompt=PROMPT, expert="a", params=p))
        assert bool(engine.model.layers[0].q.merged) is merges, mode
