"""Compression end to end on tiny Llama models with the real SmolLM2 tokenizer."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from meswitch.compress.codec import encode_delta
from meswitch.compress.config import CompressConfig
from meswitch.compress.pipeline import ArchitectureMismatchError, compress_model, held_out_batches
from meswitch.data.examples import write_jsonl
from meswitch.data.sources import domain_examples
from meswitch.deltas import decode_delta
from meswitch.deltas.apply import apply_delta
from meswitch.eval.fidelity import compare_models
from meswitch.jobs.compress_store import compress_expert, compress_into_store
from meswitch.model.checkpoint import save_checkpoint
from meswitch.store import DeltaStore
from meswitch.store.errors import BaseMismatchError, CorruptStoreError, InvalidNameError
from meswitch.store.summary import summarize
from tests.conftest import tiny_llama
from tests.engine_helpers import VOCAB, perturbed, small_config


@pytest.fixture(scope="module")
def calib():
    return domain_examples("math", 40, 0) + domain_examples("general", 40, 0)


@pytest.fixture(scope="module")
def pair():
    base = tiny_llama(vocab=VOCAB)
    return base, perturbed(base, 1)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, pair, smollm_tokenizer, calib):
    root = tmp_path_factory.mktemp("ckpts")
    base, expert = pair
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    save_checkpoint(expert, smollm_tokenizer, root / "expert", {"role": "expert"})
    write_jsonl(root / "calib.jsonl", calib)
    return root


def test_lossless_setting_reproduces_expert(pair, smollm_tokenizer, calib):
    base, expert = pair
    # every input channel salient: the delta is stored in fp16, so only fp16 rounding remains
    layers, meta, info = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib,
                                         small_config(method="salient", bits=2, salient=100000))
    merged = apply_delta(copy.deepcopy(base), layers, meta)
    ids = torch.randint(0, VOCAB, (2, 24))
    assert torch.allclose(merged(ids).logits, expert(ids).logits, atol=1e-4)
    assert info["fidelity_calib"]["kl"] < 1e-6


def test_the_recorded_fidelity_is_the_stored_deltas_against_the_expert_on_held_out_blocks(
        pair, smollm_tokenizer, calib):
    base, expert = pair
    cfg = small_config(method="rtn", bits=2)
    plain_layers, plain_meta, plain = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg)
    assert "fidelity_calib" not in plain  # the compression library does not measure its own result
    layers, meta, info = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg)
    assert meta == plain_meta and info.keys() == plain.keys() | {"fidelity_calib"}
    assert all(torch.equal(t, plain_layers[n][k]) for n, f in layers.items() for k, t in f.items())
    held_out = held_out_batches(smollm_tokenizer, calib, cfg)
    assert len(held_out) == cfg.eval_blocks and all(ids.shape == (1, cfg.calib_len) for ids, _, _ in held_out)
    merged = apply_delta(copy.deepcopy(base), layers, meta)
    assert info["fidelity_calib"] == compare_models(expert, merged, held_out).as_dict()
    assert info["fidelity_calib"]["tokens"] > 0 and info["fidelity_calib"]["kl"] > 0


def test_codec_matches_direct_quantization():
    torch.manual_seed(0)
    delta = torch.randn(48, 80) * 0.01
    # BitDelta: sign times the matrix's mean magnitude
    d = decode_delta(*encode_delta(delta, "bitdelta", 1))
    expect = torch.where(delta >= 0, 1.0, -1.0) * delta.abs().mean()
    assert torch.allclose(d, expect, rtol=1e-3)
    # rtn at 4 bits lands within half a step of every entry (absmax grid)
    fields, meta = encode_delta(delta, "rtn", 4)
    step = 2 * delta.abs().amax(1, keepdim=True) / 15
    assert ((decode_delta(fields, meta) - delta).abs() <= step / 2 * 1.01).all()
    assert meta["salient"] == 0 and "salient_idx" not in fields
    # salient columns come back exactly (fp16)
    act = torch.ones(80)
    act[[3, 50]] = 1e4
    fields, meta = encode_delta(delta, "salient", 1, k=2, act_sq=act)
    d = decode_delta(fields, meta)
    assert fields["salient_idx"].tolist() == [3, 50]
    assert torch.equal(d[:, [3, 50]], delta[:, [3, 50]].half().float())


def test_more_bits_are_more_faithful(pair, smollm_tokenizer, calib):
    base, expert = pair
    kls = []
    for bits in (1, 2, 4):
        _, _, info = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="rtn", bits=bits))
        kls.append(info["fidelity_calib"]["kl"])
        assert bits <= info["bits_per_param"] < bits + 0.5
    assert kls[0] > kls[1] > kls[2]


def test_salient_channels_beat_plain_rtn_at_same_bits(pair, smollm_tokenizer, calib):
    base, expert = pair
    _, _, rtn = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="rtn", bits=1))
    _, _, sal = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib,
                                small_config(method="salient", bits=1, salient=8))
    assert sal["fidelity_calib"]["kl"] < rtn["fidelity_calib"]["kl"]
    assert sal["bits_per_param"] > rtn["bits_per_param"]


def test_distillation_lowers_its_objective(pair, smollm_tokenizer, calib):
    base, _ = pair
    expert = perturbed(base, 2, rel=1.0)  # a large delta: one BitDelta scale per matrix fits it badly
    cfg = CompressConfig(calib_blocks=2, eval_blocks=2, calib_len=128, method="bitdelta", distill_steps=10,
                         distill_lr=0.05)
    student = copy.deepcopy(base)
    layers, meta, info = compress_model(student, expert, smollm_tokenizer, calib, cfg)
    losses = info["distill_losses"]  # the same batch every step (2 blocks, batch 2)
    assert len(losses) == 10 and losses[-1] < 0.9 * losses[0]
    # what was measured is what is stored: base + the stored (tuned) deltas, nothing else
    rebuilt = apply_delta(copy.deepcopy(base), layers, meta)
    for (name, a), (_, b) in zip(student.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    plain, _ = encode_delta(expert.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight,
                            "bitdelta", 1)
    assert not torch.equal(layers["model.layers.0.mlp.up_proj"]["scale"], plain["scale"])  # the scale was tuned


def test_target_bits_budget_is_respected(pair, smollm_tokenizer, calib):
    base, expert = pair
    _, _, info = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib,
                                small_config(method="salient", bits=1, target_bits=1.3))
    assert 1.0 < info["bits_per_param"] <= 1.3


def test_store_round_trip_and_size_accounting(ckpts, calib, tmp_path, pair):
    store_path = tmp_path / "store"
    res = compress_into_store(ckpts / "base", {"e1": ckpts / "expert"}, store_path, calib, small_config())
    store = DeltaStore.open(store_path)
    assert store.experts == ["e1"]
    # bytes per layer, read back from the file, independently of the pipeline's accounting
    layers, entry = store.load_expert("e1")
    lin = [n for n, m in entry["layers"].items() if m["method"] != "dense"]
    nbytes = sum(t.numel() * t.element_size() for n in lin for t in layers[n].values())
    params = sum(entry["layers"][n]["shape"][0] * entry["layers"][n]["shape"][1] for n in lin)
    assert res["e1"]["bits_per_param"] == pytest.approx(8 * nbytes / params)
    s = summarize(store_path)
    assert s["experts"]["e1"]["bytes"] == (store_path / "experts" / "e1.safetensors").stat().st_size
    assert s["experts"]["e1"]["ratio_vs_fp16"] > 1
    fp16_expert = 2 * sum(p.numel() for p in pair[0].parameters())  # tied weights counted once
    assert s["footprint"]["fp16_experts_bytes"] == fp16_expert
    assert s["footprint"]["store_bytes"] == fp16_expert + s["experts"]["e1"]["bytes"]


def test_bad_inputs_are_specific(ckpts, calib, tmp_path, smollm_tokenizer):
    with pytest.raises(InvalidNameError):
        compress_into_store(ckpts / "base", {"../evil": ckpts / "expert"}, tmp_path / "s", calib, small_config())
    assert not (tmp_path / "evil.safetensors").exists()
    # another architecture (different width)
    other = tiny_llama(vocab=VOCAB, layers=2)
    other.model.layers[0].mlp.up_proj = torch.nn.Linear(64, 96, bias=False)
    with pytest.raises(ArchitectureMismatchError, match="up_proj"):
        compress_model(tiny_llama(vocab=VOCAB), other, smollm_tokenizer, calib, small_config())
    # a store made from another base refuses a new expert
    store_path = tmp_path / "store"
    compress_into_store(ckpts / "base", {"e1": ckpts / "expert"}, store_path, calib, small_config())
    save_checkpoint(tiny_llama(seed=7, vocab=VOCAB), smollm_tokenizer, tmp_path / "other_base", {"role": "x"})
    with pytest.raises(BaseMismatchError):
        compress_into_store(tmp_path / "other_base", {"e2": ckpts / "expert"}, store_path, calib, small_config())
    # a truncated store file is caught before use
    f = store_path / "experts" / "e1.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptStoreError, match="truncated"):
        DeltaStore.open(store_path).load_expert("e1")


def _cli(*args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "meswitch", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_compress_inspect_fidelity(ckpts, tmp_path):
    store = tmp_path / "cli-store"
    res = _cli("compress", "--base", str(ckpts / "base"), "--expert", f"math={ckpts / 'expert'}",
               "--out", str(store), "--calib", str(ckpts / "calib.jsonl"), "--method", "rtn", "--bits", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert 2 <= out["experts"]["math"]["bits_per_param"] < 2.5
    res = _cli("inspect", str(store), "--json")
    info = json.loads(res.stdout)["experts"]["math"]
    assert {"bits_per_param", "bytes", "ratio_vs_fp16"} <= set(info)
    res = _cli("eval", "fidelity", str(store), "--expert", "math", "--text", str(ckpts / "calib.jsonl"),
               "--limit", "8", "--json")
    assert res.returncode == 0, res.stderr
    fid = json.loads(res.stdout)
    assert {"kl", "top1", "ppl_ratio", "bits_per_param"} <= set(fid)
    assert 0 <= fid["kl"] < 0.1 and 0.9 < fid["top1"] <= 1
    res = _cli("eval", "fidelity", str(store), "--expert", "nope", "--text", str(ckpts / "calib.jsonl"))
    assert res.returncode == 2 and "nope" in res.stderr and "math" in res.stderr
    res = _cli("compress", "--base", str(ckpts / "base"), "--expert", "a/b=" + str(ckpts / "expert"),
               "--out", str(store), "--calib", str(ckpts / "calib.jsonl"))
    assert res.returncode == 2 and "a/b" in res.stderr
    res = _cli("compress", "--base", str(ckpts / "base"), "--expert", f"math={ckpts / 'expert'}",
               "--out", str(store), "--calib", str(ckpts / "calib.jsonl"), "--distill-lr", "0")
    assert res.returncode == 2 and "--distill-lr must be a positive learning rate, got 0.0" in res.stderr


def test_sign2d_recovers_rank1_magnitudes_and_beats_bitdelta():
    g = torch.Generator().manual_seed(3)
    signs = torch.where(torch.rand(40, 72, generator=g) < 0.5, -1.0, 1.0)
    row, col = torch.rand(40, generator=g) + 0.1, torch.rand(72, generator=g) + 0.1
    delta = signs * row[:, None] * col[None, :] * 1e-2
    fields, meta = encode_delta(delta, "sign2d", 1)
    assert torch.allclose(decode_delta(fields, meta), delta, rtol=2e-3)  # exact up to fp16 scales
    assert fields["codes"].shape == (40, 9) and fields["col_scale"].shape == (72,)
    noisy = torch.randn(40, 72, generator=g) * 1e-2
    err = {m: (decode_delta(*encode_delta(noisy, m, 1)) - noisy).norm() for m in ("bitdelta", "sign2d")}
    assert err["sign2d"] <= err["bitdelta"] * 1.001
    # salient columns of sign2d come back exactly
    act = torch.ones(72)
    act[[5, 60]] = 1e6
    fields, meta = encode_delta(noisy, "sign2d", 1, k=2, act_sq=act)
    assert fields["salient_idx"].tolist() == [5, 60]
    assert torch.equal(decode_delta(fields, meta)[:, [5, 60]], noisy[:, [5, 60]].half().float())


def test_changed_tied_embeddings_are_stored_once_as_dense(pair, smollm_tokenizer, calib):
    base, _ = pair
    expert = copy.deepcopy(base)
    with torch.no_grad():
        expert.model.embed_tokens.weight.add_(1e-3)  # tied to lm_head: one tensor, two names
    layers, meta, info = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib,
                                        small_config(method="rtn", bits=2))
    assert meta["model.embed_tokens.weight"]["method"] == "dense" and "lm_head.weight" not in meta
    merged = apply_delta(copy.deepcopy(base), layers, meta)
    ids = torch.randint(0, VOCAB, (1, 16))
    assert torch.allclose(merged(ids).logits, expert(ids).logits, atol=1e-3)


def _student(base, expert):
    """A copy of ``base`` with ``expert``'s deltas attached as rtn-2 grids, ready to distil."""
    from meswitch.compress.calib import linear_names
    from meswitch.compress.distill import attach

    student = copy.deepcopy(base)
    layers, meta = {}, {}
    for n in linear_names(expert):
        layers[n], meta[n] = encode_delta(expert.get_submodule(n).weight - base.get_submodule(n).weight, "rtn", 2)
    attach(student, layers, meta)
    return student


def _distilled(base, expert, checkpoint_blocks: bool):
    """Grid gains after 3 distillation steps of base + rtn-2 deltas towards ``expert``, and the losses."""
    from meswitch.compress.distill import distill

    student = _student(base, expert)
    ids = torch.randint(0, 128, (4, 40), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :7] = False
    losses = distill(student, expert, ids, mask, 3, 0.05, checkpoint_blocks=checkpoint_blocks)
    return losses, {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}


def test_block_checkpointing_leaves_distillation_unchanged():
    base = tiny_llama(layers=3)
    expert = perturbed(base, 3, rel=0.3)
    kept_losses, kept = _distilled(base, expert, checkpoint_blocks=False)
    losses, tuned = _distilled(base, expert, checkpoint_blocks=True)
    assert losses == kept_losses and kept.keys() == tuned.keys()
    assert all(torch.equal(tuned[n], kept[n]) for n in kept)
    assert not any(torch.equal(t, torch.zeros_like(t)) for t in tuned.values())  # the gains did move
    assert "forward" not in vars(base.model.layers[0])  # the blocks are plain again


def test_blocks_without_a_target_token_are_skipped_not_scored_as_nan():
    from meswitch.compress.distill import distill

    base = tiny_llama(layers=2)
    expert = perturbed(base, 3, rel=0.3)
    student = _student(base, expert)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:2] = False  # the first batch of two blocks is all prompt: nothing to score
    losses = distill(student, expert, ids, mask, 2, 0.05)
    assert all(math.isfinite(x) for x in losses) and len(losses) == 2
    with pytest.raises(ValueError, match="has a token to score"):
        distill(student, expert, ids, torch.zeros_like(mask), 1, 0.05)


def test_chunked_kl_matches_the_whole_vocabulary_at_once():
    import torch.nn.functional as F

    from meswitch.compress.distill import kl_backward

    g = torch.Generator().manual_seed(6)
    head_s, head_t = (torch.nn.Linear(16, 300, bias=False).requires_grad_(False) for _ in range(2))
    x = torch.randn(50, 16, generator=g, requires_grad=True)
    h_t = torch.randn(50, 16, generator=g)
    want_loss = F.kl_div(F.log_softmax(head_s(x * 2), -1), F.log_softmax(head_t(h_t), -1).detach(),
                         log_target=True, reduction="batchmean")
    want_loss.backward()
    want, x.grad = x.grad.clone(), None
    loss = kl_backward(x * 2, h_t, head_s, head_t, chunk=16)  # chunks of 16, 16, 16, 2 tokens
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-8)
    assert loss == pytest.approx(want_loss.item(), rel=1e-6)


@pytest.mark.parametrize(("method", "bits", "k", "symmetric"), [
    ("salient", 3, 5, True), ("salient", 2, 4, False), ("rtn", 1, 0, True), ("bitdelta", 1, 0, True),
    ("sign2d", 1, 3, True),
])
def test_learnable_delta_starts_at_the_stored_delta_with_its_codes_packed(method, bits, k, symmetric):
    from meswitch.compress.distill import LearnableDelta

    g = torch.Generator().manual_seed(8)
    delta = torch.randn(24, 37, generator=g) * 1e-2  # 37 - k columns: not a whole number of bytes of codes
    act_sq = torch.rand(37, generator=g) + 0.1
    fields, meta = encode_delta(delta, method, bits, k, act_sq, symmetric)
    learn = LearnableDelta(fields, meta)
    with torch.no_grad():
        torch.testing.assert_close(learn(), decode_delta(fields, meta), rtol=0, atol=1e-7)
    # what distillation keeps per matrix is the stored bit-packed codes, not a byte per code
    assert learn.packed.data_ptr() == fields["codes"].data_ptr()
    assert all(b.numel() * b.element_size() < delta.numel() for b in learn.buffers())
