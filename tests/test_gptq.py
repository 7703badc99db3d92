"""GPTQ code choice for deltas: against a slow reference, RTN, and in the compression pipeline."""

import copy

import pytest
import torch

from meswitch.compress.allocate import (
    GPTQ_LADDER,
    Spilled,
    allocate,
    choose,
    encode_rungs,
    hessian_error,
    nbytes,
    spill,
)
from meswitch.compress.calib import collect_act_sq, collect_hessians, linear_names
from meswitch.compress.codec import encode_delta
from meswitch.compress.gptq import gptq, gptq_codes, output_error, refit_scale
from meswitch.compress.quant import qparams, quantize
from meswitch.data.sources import domain_examples
from meswitch.deltas import decode_delta, dequantize
from meswitch.model.checkpoint import save_checkpoint
from meswitch.store import DeltaStore
from tests.conftest import tiny_llama
from tests.engine_helpers import VOCAB, perturbed, small_config


def correlated(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """``H = X^T X / tokens`` for inputs whose channels are strongly correlated: ``[n, n]``."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + 2 * torch.eye(n)
    x = torch.randn(tokens, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g) + 0.3 * torch.randn(tokens, n, generator=g) @ mix
    return x.T @ x / tokens


def slow_gptq(delta, h, scale, bits, damp=0.01):
    """Optimal Brain Quantization in its textbook form, float64: quantize column 0, 1, ...; after
    each, spread its error over the remaining columns with the inverse of the remaining H block."""
    w = delta.double().clone()
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    codes = torch.empty(w.shape, dtype=torch.uint8)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        c = quantize(w[:, i : i + 1].float(), scale, None, bits)
        codes[:, i] = c[:, 0]
        err = w[:, i] - dequantize(c, scale, None, bits)[:, 0].double()
        w[:, i:] -= err[:, None] * (hinv[0, :] / hinv[0, 0])[None, :]
    return codes


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_matches_textbook_obq(bits):
    g = torch.Generator().manual_seed(bits)
    delta = torch.randn(24, 40, generator=g)
    h = correlated(40, seed=bits)
    scale, _ = qparams(delta, bits)
    fast = gptq_codes(delta, h, scale, None, bits, block=16)  # blocks of 16 exercise the lazy updates
    slow = slow_gptq(delta, h, scale, bits)
    assert (fast == slow).float().mean() > 0.995  # float32 vs float64: a rare tie may round apart


@pytest.mark.parametrize("bits", [1, 2])
def test_beats_round_to_nearest_on_the_same_grid(bits):
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(64, 96, generator=g) * 1e-3
    h = correlated(96)
    scale, _ = qparams(delta, bits)
    rtn = dequantize(quantize(delta, scale, None, bits), scale, None, bits)
    ours = dequantize(gptq_codes(delta, h, scale, None, bits), scale, None, bits)
    assert output_error(delta, ours, h) < 0.7 * output_error(delta, rtn, h)


def test_uncorrelated_inputs_give_round_to_nearest():
    delta = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    h = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.5)
    scale, _ = qparams(delta, 2)
    assert torch.equal(gptq_codes(delta, h, scale, None, 2), quantize(delta, scale, None, 2))


def test_refit_scale_is_the_least_squares_optimum():
    delta = torch.randn(8, 48, generator=torch.Generator().manual_seed(5))
    h = correlated(48, seed=5)
    q = gptq(delta, h, 1, refits=0)
    best = refit_scale(delta, h, q.codes, 1)

    def err(s):
        return output_error(delta, dequantize(q.codes, s, None, 1), h)

    assert err(best) < err(best * 1.01) and err(best) < err(best * 0.99)
    assert err(best) <= err(q.scale)


def test_unused_channels_are_rounded_and_nothing_breaks():
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(6))
    h = correlated(16, seed=6)
    h[3, :] = 0
    h[:, 3] = 0  # no calibration token used channel 3
    q = gptq(delta, h, 2)
    assert torch.isfinite(q.dequantize()).all()
    scale, _ = qparams(delta, 2, True, 0.85)
    assert torch.equal(q.codes[:, 3], quantize(delta[:, 3:4], scale, None, 2)[:, 0])


def test_bad_hessians_are_refused():
    delta = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"hessian must be \[8, 8\]"):
        gptq(delta, torch.eye(6), 2)
    h = torch.eye(8)
    h[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq(delta, h, 2)
    with pytest.raises(ValueError, match="needs the layer's input second-moment"):
        encode_delta(delta, "gptq", 2)


def test_codec_stores_the_rtn_layout_and_decodes_what_gptq_chose():
    delta = torch.randn(12, 20, generator=torch.Generator().manual_seed(8)) * 1e-2
    h = correlated(20, seed=8)
    fields, meta = encode_delta(delta, "gptq", 2, hessian=h)
    assert meta["method"] == "rtn" and meta["gptq"] and set(fields) == {"codes", "scale"}
    expect = gptq(delta, h, 2).dequantize()
    assert torch.equal(decode_delta(fields, meta), expect)  # scales are float16-representable already


def test_hessians_match_their_diagonal_and_share_inputs():
    model = tiny_llama()
    names = linear_names(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    hs = collect_hessians(model, [ids, ids[:1]], names)
    act = collect_act_sq(model, [ids, ids[:1]], names)
    for n in names:
        assert torch.allclose(hs[n].diagonal(), act[n], rtol=1e-4), n
    layer = "model.layers.0"
    assert hs[f"{layer}.self_attn.q_proj"] is hs[f"{layer}.self_attn.k_proj"] is hs[f"{layer}.self_attn.v_proj"]
    assert hs[f"{layer}.mlp.gate_proj"] is hs[f"{layer}.mlp.up_proj"]
    assert hs[f"{layer}.mlp.up_proj"] is not hs[f"{layer}.mlp.down_proj"]
    assert hs[f"{layer}.self_attn.q_proj"] is not hs["model.layers.1.self_attn.q_proj"]


def test_gptq_ladder_spends_the_budget_where_the_output_error_is():
    g = torch.Generator().manual_seed(0)
    deltas = {"hot": torch.randn(32, 48, generator=g), "cold": torch.randn(32, 48, generator=g)}
    h = correlated(48)
    stats = {"hot": 100 * h, "cold": 0.01 * h}
    choice = allocate({n: (lambda d=d: d) for n, d in deltas.items()}, stats, 1.9, GPTQ_LADDER, hessian_error)
    params = sum(d.numel() for d in deltas.values())
    assert 8 * sum(nbytes(f) for f, _ in choice.values()) / params <= 1.9
    assert choice["hot"][1]["rung"] == "gptq2" and choice["cold"][1]["rung"] == "gptq1"


def test_a_spilled_ladder_chooses_the_same_encodings_from_disk(tmp_path):
    g = torch.Generator().manual_seed(3)
    h = correlated(48)
    rungs = {n: encode_rungs(torch.randn(32, 48, generator=g) * s, h * s, GPTQ_LADDER, hessian_error, h)
             for n, s in (("a", 1.0), ("b", 0.1), ("c", 3.0))}
    spilled = {n: spill(r, tmp_path / f"{n}.safetensors") for n, r in rungs.items()}
    # in memory: only (where, meta), proxy error and bytes per rung; the tensors are on disk
    assert all(isinstance(e[0], Spilled) for r in spilled.values() for e, _, _ in r)
    assert [[(err, size) for _, err, size in r] for r in spilled.values()] == \
        [[(err, size) for _, err, size in r] for r in rungs.values()]
    want, got = choose(rungs, 3 * 32 * 48, 1.7, GPTQ_LADDER), choose(spilled, 3 * 32 * 48, 1.7, GPTQ_LADDER)
    assert {n: m["rung"] for n, (_, m) in got.items()} == {n: m["rung"] for n, (_, m) in want.items()}
    assert len({m["rung"] for _, m in got.values()}) > 1  # the budget bought some layers more bits
    for n, (fields, meta) in want.items():
        assert got[n][1] == meta and fields.keys() == got[n][0].keys()
        assert all(torch.equal(t, got[n][0][k]) for k, t in fields.items())


def test_the_pipeline_spills_its_ladder_to_a_temporary_directory_it_removes(smollm_tokenizer, tmp_path, monkeypatch):
    import tempfile

    from meswitch.compress.pipeline import compress_model

    calib = domain_examples("math", 40, 0) + domain_examples("general", 40, 0)
    base = tiny_llama(vocab=VOCAB)
    expert = perturbed(base, 1)
    cfg = small_config(method="gptq-mixed", target_bits=1.5)
    kept, _, _ = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg, rung_cache={})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = []
    real_spill = spill

    def spy(rungs, path):
        made.append(path)
        return real_spill(rungs, path)

    monkeypatch.setattr("meswitch.compress.allocate.spill", spy)
    spilled, _, _ = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg)
    assert len(made) == len(linear_names(base)) and all(p.parent.parent == tmp_path for p in made)
    assert list(tmp_path.iterdir()) == []  # removed once the choice is made
    assert kept.keys() == spilled.keys()
    for n, fields in kept.items():
        assert all(torch.equal(t, spilled[n][k]) for k, t in fields.items()), n


def test_gptq_beats_rtn_end_to_end_and_the_store_serves_it(smollm_tokenizer, tmp_path):
    from meswitch.deltas.apply import apply_delta
    from meswitch.engine import Engine, EngineConfig
    from meswitch.jobs.compress_store import compress_expert, compress_into_store
    from tests.engine_helpers import hf_logits, teacher_forced_logits

    calib = domain_examples("math", 40, 0) + domain_examples("general", 40, 0)
    base = tiny_llama(vocab=VOCAB)
    expert = perturbed(base, 1)
    _, _, rtn = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="rtn", bits=1))
    _, _, ours = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="gptq", bits=1))
    assert ours["fidelity_calib"]["kl"] < rtn["fidelity_calib"]["kl"]
    _, _, mixed = compress_expert(copy.deepcopy(base), expert, smollm_tokenizer, calib,
                                  small_config(method="gptq-mixed", target_bits=1.5))
    assert 1.0 < mixed["bits_per_param"] <= 1.5
    assert mixed["fidelity_calib"]["kl"] < ours["fidelity_calib"]["kl"]

    save_checkpoint(base, smollm_tokenizer, tmp_path / "base", {"role": "base"})
    save_checkpoint(expert, smollm_tokenizer, tmp_path / "expert", {"role": "expert"})
    compress_into_store(tmp_path / "base", {"e": tmp_path / "expert"}, tmp_path / "store", calib,
                        small_config(method="gptq-mixed", target_bits=1.5))
    store = DeltaStore.open(tmp_path / "store")
    layers, entry = store.load_expert("e")
    assert {m["method"] for m in entry["layers"].values()} == {"rtn", "dense"}
    assert {m["bits"] for m in entry["layers"].values() if m["method"] == "rtn"} >= {1, 2}
    # the engine's exact path reproduces a transformers model with W_base + the decoded delta
    eng = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig(backend="reference"))
    ids = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    got = teacher_forced_logits(eng, {"e": ids}, prefill=4)["e"]
    want = hf_logits(apply_delta(copy.deepcopy(base), layers, entry["layers"]), ids, 4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_output_gradients_match_autograd_and_leave_the_model_alone():
    from meswitch.compress.calib import collect_output_grad_sq

    model = tiny_llama()
    names = linear_names(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    got = collect_output_grad_sq(model, [ids], names)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    # by hand: keep the output of one layer, backpropagate the summed next-token loss to it
    target = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    kept = {}

    def keep(_m, _a, out):
        out.retain_grad()
        kept["y"] = out

    h = target.register_forward_hook(keep)
    logits = model(input_ids=ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1), reduction="sum").backward()
    h.remove()
    want = kept["y"].grad.reshape(-1, kept["y"].shape[-1]).square().mean(0)
    torch.testing.assert_close(got["model.layers.1.mlp.down_proj"], want, rtol=1e-4, atol=1e-10)
    assert got["model.layers.1.mlp.down_proj"].shape == (target.out_features,)


def test_rung_cache_gives_the_same_choice_under_another_budget():
    g = torch.Generator().manual_seed(9)
    deltas = {f"m{i}": torch.randn(16, 64, generator=g) for i in range(4)}
    stats = {n: correlated(64, seed=i) * (i + 1) for i, n in enumerate(deltas)}
    getters = {n: (lambda d=d: d) for n, d in deltas.items()}
    cache: dict = {}
    for bits in (1.4, 1.9, 2.6):
        fresh = allocate(getters, stats, bits, GPTQ_LADDER, hessian_error)
        cached = allocate(getters, stats, bits, GPTQ_LADDER, hessian_error, cache=cache)
        assert {n: m["rung"] for n, (_, m) in fresh.items()} == {n: m["rung"] for n, (_, m) in cached.items()}
        assert all(torch.equal(fresh[n][0]["codes"], cached[n][0]["codes"]) for n in deltas)
    assert set(cache) == set(deltas)


def test_hessians_by_block_are_collect_hessians_one_block_at_a_time():
    from meswitch.compress.calib import hessians_by_block

    model = tiny_llama(layers=3)
    names = linear_names(model)
    ids = torch.randint(0, 128, (7, 20), generator=torch.Generator().manual_seed(4))
    sets = [ids[:5].split(2), ids[5:].split(2)]  # uneven batches: 2, 2, 1
    want = [collect_hessians(model, s, names) for s in sets]
    seen = []
    for inside, got in hessians_by_block(model, sets, names):
        assert len(got) == 2 and all(set(g) == set(inside) for g in got)
        for g, w in zip(got, want, strict=True):
            for n in inside:
                assert torch.equal(g[n], w[n]), n
        assert got[0][inside[0]] is got[0][inside[1]]  # q and k share their input's matrix, as before
        seen += inside
    assert seen == names
    with pytest.raises(ValueError, match="not inside the decoder blocks"):
        next(hessians_by_block(model, sets, [*names, "lm_head"]))


@pytest.mark.parametrize("method", ["gptq", "gptq-mixed"])
def test_streamed_statistics_store_what_all_at_once_statistics_store(method, smollm_tokenizer):
    """compress_model's block-by-block statistics give the codes, scales and rungs of the statistics
    of every layer collected at once (expert_hessians), distillation included."""
    from meswitch.compress.pipeline import compress_model, expert_hessians

    calib = domain_examples("math", 40, 0) + domain_examples("general", 40, 0)
    base = tiny_llama(vocab=VOCAB, layers=3)
    expert = perturbed(base, 1)
    cfg = small_config(method=method, bits=1, target_bits=1.5, distill_steps=2)
    hess = expert_hessians(expert, smollm_tokenizer, calib, cfg, allocation=method == "gptq-mixed")
    old_layers, old_meta, _ = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg, hessians=hess)
    cache: dict = {}
    runs = [compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg, rung_cache=cache)]
    if method == "gptq-mixed":  # a second run takes every ladder from the cache, no statistics
        assert set(cache) == set(linear_names(expert))
        runs.append(compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, cfg, rung_cache=cache))
    assert method == "gptq" or {m.get("rung") for m in old_meta.values()} >= {"gptq1", "gptq2"}
    for layers, meta, _ in runs:
        assert meta == old_meta and list(layers) == list(old_layers)
        for name, fields in old_layers.items():
            assert fields.keys() == layers[name].keys(), name
            for k, t in fields.items():
                assert torch.equal(t, layers[name][k]), (name, k)


def test_a_rung_cache_filled_by_the_mixed_method_leaves_plain_gptq_alone(smollm_tokenizer):
    from meswitch.compress.pipeline import compress_model

    calib = domain_examples("math", 40, 0)
    base = tiny_llama(vocab=VOCAB)
    expert = perturbed(base, 2)
    cache: dict = {}
    compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="gptq-mixed", target_bits=1.5),
                   rung_cache=cache)
    assert len(cache) == len(linear_names(base))
    _, meta, _ = compress_model(copy.deepcopy(base), expert, smollm_tokenizer, calib, small_config(method="gptq", bits=3),
                                rung_cache=cache)
    assert {meta[n]["bits"] for n in linear_names(base)} == {3}
