"""lowrank: a full fine-tune's linear deltas stored as their truncated SVD (16-bit LowRankDelta factors).

Every expectation is computed here independently: the test's own ``torch.linalg.svd`` in float64, the
Eckart-Young error (the norm of the discarded singular values), sizes from the shapes, and deltas rebuilt
from the stored tensors by hand.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from meswitch.cli import main
from meswitch.compress.codec import LowRankError, encode_delta, layer_bits, lowrank_delta, quantize_delta
from meswitch.compress.config import CompressConfig, CompressConfigError
from meswitch.compress.pipeline import compress_model
from meswitch.data.examples import Example, write_jsonl
from meswitch.deltas import LowRankDelta, decode
from meswitch.engine import Engine, EngineConfig
from meswitch.model.checkpoint import save_checkpoint
from meswitch.store import DeltaStore, base_info, fingerprint_model
from meswitch.store.summary import summarize
from tests.conftest import tiny_llama
from tests.engine_helpers import (
    VOCAB,
    ByteTokenizer,
    hf_logits,
    perturbed,
    small_config,
    teacher_forced_logits,
)

OUT, IN = 48, 80
PREFILL, LENGTH = 5, 11


def spectrum_matrix(seed: int, decay: float = 0.8, magnitude: float = 1e-3) -> torch.Tensor:
    """``[OUT, IN]`` float32 ``Q1 diag(magnitude * decay^i) Q2^T`` with random orthonormal ``Q1``, ``Q2``."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(IN, OUT, generator=g, dtype=torch.float64))
    s = magnitude * decay ** torch.arange(OUT, dtype=torch.float64)
    return (q1 * s @ q2.T).float()


def truncated(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(best rank-``r`` approximation ``[out, in]`` float64, all singular values) by the test's own SVD."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return u[:, :r] * s[:r] @ vh[:r], s


def by_hand(fields: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The delta from stored factors, following the format: ``scale * lora_b @ lora_a`` (float64)."""
    return meta["scale"] * fields["lora_b"].double() @ fields["lora_a"].double()


@pytest.mark.parametrize("r", [1, 5, 17])  # tails far above the fp16 rounding of the factors
def test_the_record_is_the_best_rank_r_approximation(r):
    delta = spectrum_matrix(seed=r)
    fields, meta = encode_delta(delta, "lowrank", r)
    want, s = truncated(delta, r)
    got = by_hand(fields, meta)
    fp16 = 2e-3 * want.abs().max()  # the factors are fp16: ~2^-11 relative per entry
    torch.testing.assert_close(got, want, rtol=0, atol=float(fp16))
    # Eckart-Young: the error of the best rank-r approximation is the norm of the singular values left out
    tail = s[r:].norm()
    assert float((delta.double() - got).norm()) == pytest.approx(float(tail), rel=1e-2)
    # and it beats the rank-r approximation that keeps other singular directions
    u, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    other = u[:, 1 : r + 1] * s[1 : r + 1] @ vh[1 : r + 1]
    assert (delta.double() - got).norm() < (delta.double() - other).norm()


def test_fields_meta_and_size_follow_the_rank():
    r = 7
    fields, meta = encode_delta(spectrum_matrix(seed=1), "lowrank", r)
    assert {k: (t.dtype, list(t.shape)) for k, t in fields.items()} == {
        "lora_a": (torch.float16, [r, IN]), "lora_b": (torch.float16, [OUT, r])}
    assert meta["method"] == "lora" and meta["svd"] is True and meta["rank"] == r and meta["shape"] == [OUT, IN]
    assert layer_bits(fields, meta) == pytest.approx(16 * r * (OUT + IN) / (OUT * IN))
    record = decode(fields, meta)  # the existing decoder reads it as the low-rank record it is
    assert isinstance(record, LowRankDelta) and record.rank == r
    torch.testing.assert_close(record.dequantize().double(), by_hand(fields, meta), rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("magnitude", [1e-3, 1e-7, 10.0])
def test_a_full_rank_record_is_exact_within_fp16_at_any_magnitude(magnitude):
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(OUT, IN, generator=g) * magnitude
    record = lowrank_delta(delta, min(OUT, IN))
    err = (record.dequantize() - delta).abs().max()
    cast = (delta.half().float() - delta).abs().max()  # what storing the delta itself in fp16 loses
    assert err <= 8 * cast, (float(err), float(cast))
    assert err <= 2e-3 * delta.abs().max()


def test_a_zero_delta_is_a_zero_record():
    record = lowrank_delta(torch.zeros(OUT, IN), 3)
    assert record.scale == 1.0 and torch.equal(record.dequantize(), torch.zeros(OUT, IN))


@pytest.mark.parametrize("rank", [0, -2, OUT + 1, 2.5, True])
def test_a_rank_outside_one_to_min_out_in_is_refused(rank):
    with pytest.raises(LowRankError, match=rf"rank must be an integer in \[1, {OUT}\].*\[{OUT}, {IN}\]"):
        lowrank_delta(spectrum_matrix(seed=0), rank)


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(CompressConfigError, match="rank must be a positive integer, got 0"):
        CompressConfig(method="lowrank", rank=0)
    with pytest.raises(CompressConfigError, match="method 'lowrank' only, not 'gptq'"):
        CompressConfig(method="gptq", rank=4)
    with pytest.raises(CompressConfigError, match="not both"):
        CompressConfig(method="lowrank", rank=4, target_bits=2.0)
    with pytest.raises(CompressConfigError, match="no quantization grid to distil"):
        CompressConfig(method="lowrank", distill_steps=5)
    with pytest.raises(CompressConfigError, match=r"rank 97 exceeds the rank of layer 'x' \[96, 128\]"):
        CompressConfig(method="lowrank", rank=97).layer_rank(96, 128, "x")
    with pytest.raises(ValueError, match="not a quantized form"):
        quantize_delta(spectrum_matrix(seed=0), "lowrank", 16)


@pytest.mark.parametrize(("out", "n", "bits"), [(576, 576, 1.0), (1536, 576, 2.0), (192, 576, 3.0), (64, 64, 1.5),
                                                  (64, 128, 100.0), (8, 8, 0.01)])
def test_a_bit_budget_picks_the_largest_rank_within_it(out, n, bits):
    r = CompressConfig(method="lowrank", target_bits=bits).layer_rank(out, n)
    cost = lambda k: 16 * k * (out + n) / (out * n)  # noqa: E731
    assert 1 <= r <= min(out, n)
    assert cost(r) <= bits or r == 1  # at least rank 1, even past a tiny budget
    assert r == min(out, n) or cost(r + 1) > bits
    assert CompressConfig(method="lowrank").budget == 1.5  # the default store's size


def _calib(n: int = 40) -> list[Example]:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "the", "code", "x", "=", "1", "2", "+"]
    return [Example(" ".join(rng.choice(words) for _ in range(40)), "text") for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama (hidden 64, vocabulary 256), a perturbed expert and its lowrank store at rank 8."""
    base = tiny_llama(vocab=256)
    expert = perturbed(base, 1)
    compressed = copy.deepcopy(base)
    layers, meta, info = compress_model(compressed, expert, ByteTokenizer(), _calib(),
                                        small_config(method="lowrank", rank=8))
    root = tmp_path_factory.mktemp("lowrank")
    store = DeltaStore.create(root / "store", fingerprint_model(base), base_info(base))
    store.add_expert("lr", layers, meta, info)
    return base, expert, compressed, layers, meta, info, root


def test_compress_model_stores_each_linear_delta_as_its_svd(tiny):
    base, expert, compressed, layers, meta, info, _ = tiny
    b, e, c = base.state_dict(), expert.state_dict(), compressed.state_dict()
    linears = [n for n, m in expert.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert {n for n, m in meta.items() if m["method"] == "lora"} == set(linears)
    params = bits = 0
    for n in linears:
        w = f"{n}.weight"
        want, _ = truncated(e[w] - b[w], 8)
        got = c[w].double() - b[w].double()  # the base, left as base + the stored delta
        torch.testing.assert_close(got, want, rtol=0, atol=float(2e-3 * want.abs().max()) + 1e-6)
        out, n_in = e[w].shape
        params += out * n_in
        bits += 16 * 8 * (out + n_in)
    assert info["bits_per_param"] == pytest.approx(bits / params)
    assert info["config"]["method"] == "lowrank" and info["config"]["steps"] == 0


def test_store_round_trip_keeps_the_factors_bit_for_bit(tiny):
    _, _, _, layers, meta, _, root = tiny
    loaded, entry = DeltaStore.open(root / "store").load_expert("lr")
    for n, m in meta.items():
        assert entry["layers"][n]["method"] == m["method"]
        for f, t in layers[n].items():
            assert loaded[n][f].dtype == t.dtype and torch.equal(loaded[n][f], t), (n, f)
        if m["method"] == "lora":
            assert entry["layers"][n]["rank"] == 8 and entry["layers"][n]["scale"] == m["scale"]
            assert isinstance(decode(loaded[n], entry["layers"][n]), LowRankDelta)
    assert summarize(root / "store")["experts"]["lr"]["method"] == "lowrank"


@pytest.mark.parametrize("backend", ["reference", "pytorch"])
def test_the_engine_serves_a_lowrank_expert_as_transformers_on_base_plus_the_stored_deltas(tiny, backend):
    base, _, _, _, _, _, root = tiny
    store = DeltaStore.open(root / "store")
    engine = Engine(store, copy.deepcopy(base), ByteTokenizer(), EngineConfig(backend=backend))
    g = torch.Generator().manual_seed(5)
    seqs = {n: torch.randint(0, 256, (LENGTH,), generator=g).tolist() for n in ("lr", "base")}
    got = teacher_forced_logits(engine, seqs, prefill=PREFILL)  # one mixed batch: the expert and the base
    layers, entry = store.load_expert("lr")
    merged = copy.deepcopy(base)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for n, m in entry["layers"].items():  # rebuilt from the stored tensors by hand, not by the decoder
            if m["method"] == "dense":
                params[n].add_(layers[n]["delta"].float())
            else:
                params[f"{n}.weight"].add_(by_hand(layers[n], m).float())
    torch.testing.assert_close(got["lr"], hf_logits(merged, seqs["lr"], PREFILL), atol=1e-4, rtol=0)
    torch.testing.assert_close(got["base"], hf_logits(base, seqs["base"], PREFILL), atol=1e-4, rtol=0)
    assert (got["lr"] - got["base"]).abs().max() > 1e-3


def test_a_rank_beyond_a_layer_is_refused_naming_it(tiny):
    base, expert = tiny[0], tiny[1]
    with pytest.raises(CompressConfigError, match=r"rank 33 exceeds the rank of layer 'model\.layers\.0\.self_attn"
                                                  r"\.k_proj' \[32, 64\]"):
        compress_model(copy.deepcopy(base), expert, ByteTokenizer(), _calib(), small_config(method="lowrank", rank=33))


def test_cli_compress_lowrank_and_inspect(smollm_tokenizer, tmp_path, capsys):
    base = tiny_llama(vocab=VOCAB)  # the SmolLM2 tokenizer's vocabulary
    expert = perturbed(base, 1)
    save_checkpoint(base, smollm_tokenizer, tmp_path / "base", {"role": "base"})
    save_checkpoint(expert, smollm_tokenizer, tmp_path / "expert", {"role": "expert"})
    write_jsonl(tmp_path / "calib.jsonl", _calib(200))
    args = ["compress", "--base", str(tmp_path / "base"), "--expert", f"e={tmp_path / 'expert'}",
            "--calib", str(tmp_path / "calib.jsonl"), "--method", "lowrank"]
    assert main([*args, "--out", str(tmp_path / "s"), "--target-bits", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["experts"]["e"]
    assert out["bits_per_param"] <= 2 and out["config"]["bits"] == 16
    assert main(["inspect", str(tmp_path / "s")]) == 0
    assert "lowrank" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "s2"), "--rank", "0"]) == 2
    assert "rank must be a positive integer, got 0" in capsys.readouterr().err
    assert main([*args[:-1], "rtn", "--out", str(tmp_path / "s3"), "--rank", "4"]) == 2
    assert "method 'lowrank' only" in capsys.readouterr().err
    assert not (tmp_path / "s2").exists() and not (tmp_path / "s3").exists()
