"""Checkpoint layouts: sharded safetensors with an index, fp32/fp16/bf16 weights, tied and untied
embeddings, experts that changed the embeddings, output projection or norms; and the checkpoints
meswitch must refuse (missing or truncated shards, another architecture, vocabulary or shapes)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meswitch.data.examples import Example
from meswitch.deltas import decode
from meswitch.deltas.apply import apply_delta
from meswitch.engine import Engine, EngineConfig
from meswitch.jobs.compress_store import compress_into_store
from meswitch.model.checkpoint import load_model, save_checkpoint
from meswitch.model.layout import CheckpointError, CheckpointMismatchError, read_layout
from meswitch.store import DeltaStore
from meswitch.store.summary import summarize
from tests.engine_helpers import VOCAB, hf_logits, small_config, teacher_forced_logits

WORDS = ["the", "a", "cat", "dog", "runs", "fast", "slow", "red", "blue", "one", "two", "three", "and", "or", "if", "then", "sum", "of", "numbers"]


def calib() -> list[Example]:
    rng = random.Random(0)
    return [Example(" ".join(rng.choice(WORDS) for _ in range(60)), "text") for _ in range(40)]


def llama(tied: bool, seed: int = 0, vocab: int = VOCAB, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def fine_tuned(base, dtype: torch.dtype, seed: int = 1):
    """``base`` with every weight moved (embeddings, output projection and norms too), in ``dtype``."""
    expert = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().clamp(min=0.1) * 0.05)
    return expert.to(dtype)


def shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


LAYOUTS = [  # (base dtype, expert dtype, expert shard size or None, tied)
    pytest.param((torch.float32, torch.bfloat16, "400KB", True), id="fp32-base+bf16-sharded-expert,tied"),
    pytest.param((torch.float16, torch.float16, None, False), id="fp16-base+fp16-expert,untied"),
    pytest.param((torch.bfloat16, torch.float32, "1MB", False), id="bf16-base+fp32-sharded-expert,untied"),
]


@pytest.fixture(scope="module", params=LAYOUTS)
def compressed(request, tmp_path_factory, smollm_tokenizer):
    """A base and a fine-tune saved in one of :data:`LAYOUTS`, compressed into a store (4-bit rtn)."""
    base_dtype, expert_dtype, shard, tied = request.param
    root = tmp_path_factory.mktemp("layout")
    base = llama(tied).to(base_dtype)
    expert = fine_tuned(base, expert_dtype)
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    expert.save_pretrained(root / "expert", **({"max_shard_size": shard} if shard else {}))  # no tokenizer
    info = compress_into_store(root / "base", {"ft": root / "expert"}, root / "store", calib(),
                               small_config(method="rtn", bits=4))
    return root, tied, shard, info["ft"]


def test_the_layout_is_read_from_the_headers(compressed):
    root, tied, shard, _ = compressed
    layout = read_layout(root / "expert")
    assert (len(layout.files) > 1) == (shard is not None)
    assert layout.files == (tuple(p.name for p in shards(root / "expert")) if shard else ("model.safetensors",))
    on_disk = {}
    for f in layout.files:
        on_disk |= {n: list(t.shape) for n, t in load_file(root / "expert" / f).items()}
    assert {n: list(t.shape) for n, t in layout.tensors.items()} == on_disk
    assert ("lm_head.weight" in layout.tensors) == (not tied)


def test_a_sharded_or_16_bit_checkpoint_loads_to_the_values_saved(compressed):
    root, *_ = compressed
    model = load_model(root / "expert")
    saved = {}
    for f in read_layout(root / "expert").files:
        saved |= load_file(root / "expert" / f)
    state = model.state_dict()
    for name, t in saved.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], t.float()), name


def test_changed_embeddings_head_and_norms_are_stored_as_the_fine_tune_moved_them(compressed):
    root, tied, *_ = compressed
    store = DeltaStore.open(root / "store")
    b, e = load_model(root / "base").state_dict(), load_model(root / "expert").state_dict()
    layers, entry = store.load_expert("ft")
    others = ["model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"]
    if not tied:
        others.append("lm_head.weight")
    else:
        assert "lm_head.weight" not in layers  # one tensor under two names: stored once
    for name in others:
        fields, meta = layers[name], entry["layers"][name]
        want = e[name] - b[name]
        got = decode(fields, meta).dequantize().float()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.half().float(), atol=0, rtol=0)  # the delta, in fp16


def test_every_stored_byte_is_counted_in_the_bits_per_parameter(compressed):
    root, tied, _, info = compressed
    e = summarize(root / "store")["experts"]["ft"]
    n_params = sum(p.numel() for p in llama(tied).parameters())  # tied weights counted once
    (file,) = (root / "store").rglob("*.safetensors")  # the one expert's file
    file_bytes = file.stat().st_size
    assert e["bytes"] == file_bytes
    assert e["bits_per_param_all"] == pytest.approx(8 * file_bytes / n_params)
    # the 16-bit embeddings alone are ~2/3 of the parameters: far above the linear layers' 4 bits
    assert e["bits_per_param_all"] > 8 > e["bits_per_param"]


@pytest.mark.parametrize("backend", ["reference", "pytorch"])
def test_the_engine_serves_the_changed_embeddings_head_and_norms_in_a_mixed_batch(compressed, smollm_tokenizer,
                                                                                   backend):
    root, *_ = compressed
    store = DeltaStore.open(root / "store")
    base = load_model(root / "base")
    reference = copy.deepcopy(base)
    layers, entry = store.load_expert("ft")
    apply_delta(reference, layers, entry["layers"])
    eng = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig(backend=backend))
    seqs = {"ft": [1, 17, 923, 4410, 52, 7, 300, 12], "base": [1, 99, 5, 800, 3000, 41, 6, 7]}
    got = teacher_forced_logits(eng, seqs, prefill=4)
    torch.testing.assert_close(got["ft"], hf_logits(reference, seqs["ft"], 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["base"], hf_logits(base, seqs["base"], 4), atol=1e-4, rtol=0)


# ---- what is refused, before anything is written -------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm_tokenizer):
    root = tmp_path_factory.mktemp("bad")
    base = llama(True)
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    fine_tuned(base, torch.bfloat16).save_pretrained(root / "sharded", max_shard_size="400KB")
    return root, base


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _refused(root: Path, expert: Path, tmp_path: Path, error: type, *words: str) -> None:
    store = tmp_path / "store"
    with pytest.raises(error) as e:
        compress_into_store(root / "base", {"x": expert}, store, calib(), small_config(method="rtn", bits=4))
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not store.exists()  # nothing written


def test_a_missing_shard_is_named(pair, tmp_path):
    root, _ = pair
    bad = _copy(root / "sharded", tmp_path / "ckpt")
    gone = shards(bad)[1]
    gone.unlink()
    _refused(root, bad, tmp_path, CheckpointError, gone.name, "missing", "model.safetensors.index.json")


def test_an_index_naming_a_file_that_is_not_there_is_named(pair, tmp_path):
    root, _ = pair
    bad = _copy(root / "sharded", tmp_path / "ckpt")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00099-of-00099.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(root, bad, tmp_path, CheckpointError, "model-00099-of-00099.safetensors", "missing")


def test_a_tensor_moved_to_another_shard_than_the_index_says_is_named(pair, tmp_path):
    root, _ = pair
    bad = _copy(root / "sharded", tmp_path / "ckpt")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(root, bad, tmp_path, CheckpointError, name, files[1], "does not hold it")


def test_a_truncated_shard_is_named(pair, tmp_path):
    root, _ = pair
    bad = _copy(root / "sharded", tmp_path / "ckpt")
    cut = shards(bad)[0]
    cut.write_bytes(cut.read_bytes()[:-100])
    _refused(root, bad, tmp_path, CheckpointError, cut.name, "truncated")


def test_a_pickled_checkpoint_is_refused_with_the_fix(pair, tmp_path):
    root, base = pair
    bad = tmp_path / "ckpt"
    base.save_pretrained(bad)
    (bad / "model.safetensors").unlink()
    torch.save(base.state_dict(), bad / "pytorch_model.bin")
    _refused(root, bad, tmp_path, CheckpointError, "pytorch_model.bin", "safe_serialization")


def test_an_expert_with_extra_tokens_is_refused_with_the_reason(pair, tmp_path):
    root, base = pair
    grown = copy.deepcopy(base)
    grown.resize_token_embeddings(VOCAB + 8)
    grown.save_pretrained(tmp_path / "ckpt")
    _refused(root, tmp_path / "ckpt", tmp_path, CheckpointMismatchError, f"{VOCAB + 8} tokens", f"base {VOCAB}",
             "model.embed_tokens.weight", "model.safetensors")


def test_an_expert_of_another_architecture_is_refused(pair, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    root, base = pair
    cfg = MistralConfig(**{k: v for k, v in base.config.to_dict().items() if k in MistralConfig().to_dict()})
    MistralForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    _refused(root, tmp_path / "ckpt", tmp_path, CheckpointMismatchError, "MistralForCausalLM", "LlamaForCausalLM")


def test_an_expert_with_other_shapes_is_refused_naming_the_tensor_and_file(pair, tmp_path):
    root, _ = pair
    llama(True, intermediate=96).save_pretrained(tmp_path / "ckpt")
    _refused(root, tmp_path / "ckpt", tmp_path, CheckpointMismatchError, "mlp.down_proj", "[64, 96]", "[64, 128]",
             "model.safetensors")


def test_an_expert_that_unties_the_embeddings_is_refused(pair, tmp_path):
    root, base = pair
    untied = llama(False)
    untied.load_state_dict(base.state_dict(), strict=False)
    untied.save_pretrained(tmp_path / "ckpt")
    _refused(root, tmp_path / "ckpt", tmp_path, CheckpointMismatchError, "tie_word_embeddings=False")


def test_a_bad_expert_leaves_an_existing_store_as_it_was(pair, tmp_path):
    root, _ = pair
    store = tmp_path / "store"
    compress_into_store(root / "base", {"good": root / "sharded"}, store, calib(), small_config(method="rtn", bits=4))
    before = {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    bad = _copy(root / "sharded", tmp_path / "ckpt")
    shards(bad)[0].unlink()
    with pytest.raises(CheckpointError):
        compress_into_store(root / "base", {"other": root / "sharded", "bad": bad}, store, calib(),
                            small_config(method="rtn", bits=4))
    assert {p.relative_to(store): p.read_bytes() for p in store.rglob("*") if p.is_file()} == before


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads Linux's /proc")
def test_a_16_bit_checkpoint_is_mapped_as_float32_file_pages_not_copied_into_memory(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("MESWITCH_CACHE", str(tmp_path / "cache"))
    cfg = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt", max_shard_size="8MB")
    f32_bytes = 4 * sum(t.numel() for f in shards(tmp_path / "ckpt") for t in load_file(f).values())
    before = _rss_anon()
    model = load_model(tmp_path / "ckpt")
    for p in model.parameters():  # touch every page
        p.sum()
    grown = _rss_anon() - before
    assert grown < 0.25 * f32_bytes, f"anonymous memory grew by {grown / 2**20:.1f} MiB for {f32_bytes / 2**20:.1f}"
    assert next(model.parameters()).dtype == torch.float32
    assert not any((tmp_path / "cache" / "tmp").iterdir())  # the float32 copy is unlinked once mapped
