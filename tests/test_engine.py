"""The multi-expert engine against Hugging Face transformers: logits, greedy tokens, batching, residency."""

from __future__ import annotations

import copy

import pytest
import torch

from meswitch.deltas.apply import apply_delta
from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.engine.errors import (
    BudgetError,
    ContextLengthError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownModelError,
)
from meswitch.engine.kernels import lowbit_cpu
from meswitch.engine.layers import ExpertLinear
from meswitch.engine.request import Route
from meswitch.store import DeltaStore
from meswitch.store.errors import BaseMismatchError
from tests.engine_helpers import (
    expert_layers,
    hf_logits,
    make_store,
    perturbed,
    teacher_forced_logits,
    tiny_base,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPTS = ["Hello there, how are", "def add(a, b):", "What is 7 times 6?", "The weather today"]


@pytest.fixture(scope="module")
def models():
    base = tiny_base()
    return base, {"a": perturbed(base, 1), "b": perturbed(base, 2), "c": perturbed(base, 3, norms=False)}


@pytest.fixture(scope="module")
def lossless(models, tmp_path_factory):
    base, experts = models
    return make_store(tmp_path_factory.mktemp("lossless") / "store", base, experts)


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    base, experts = models
    return make_store(tmp_path_factory.mktemp("quant") / "store", base, experts, method="salient", bits=2, k=8)


def _engine(store, base, tok, **kw) -> Engine:
    return Engine(store, copy.deepcopy(base), tok, EngineConfig(**kw))


def test_lossless_deltas_reproduce_each_expert_in_a_mixed_batch(models, lossless, smollm_tokenizer):
    base, experts = models
    eng = _engine(lossless, base, smollm_tokenizer)
    g = torch.Generator().manual_seed(0)
    seqs = {n: torch.randint(0, 49152, (12,), generator=g).tolist() for n in ["a", "base", "b", "c"]}
    got = teacher_forced_logits(eng, seqs, prefill=5)
    for name, ids in seqs.items():
        want = hf_logits(base if name == "base" else experts[name], ids, 5)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"expert {name}")


def test_quantized_deltas_match_transformers_model_with_dequantized_weights(models, quantized, smollm_tokenizer):
    base, experts = models
    exact = _engine(quantized, base, smollm_tokenizer, backend="reference")  # the exact path
    fused = _engine(quantized, base, smollm_tokenizer, backend="int4")  # bf16 in the delta term
    low = _engine(quantized, base, smollm_tokenizer)  # the default, "lowbit": int8 activations in the delta term
    g = torch.Generator().manual_seed(1)
    seqs = {n: torch.randint(0, 49152, (10,), generator=g).tolist() for n in ["b", "a"]}
    got, approx = teacher_forced_logits(exact, seqs, prefill=4), teacher_forced_logits(fused, seqs, prefill=4)
    approx_low = teacher_forced_logits(low, seqs, prefill=4)
    forms = {type(d).__name__ for m in low.model.modules() if isinstance(m, ExpertLinear) for d in m.deltas.values()}
    assert low.backend_selection.backend.name == ("lowbit" if lowbit_cpu.available() else "int4")
    assert forms == ({"LowbitForm"} if lowbit_cpu.available() else {"Int4Form"})
    for name, ids in seqs.items():
        layers, entry = quantized.load_expert(name)
        want = hf_logits(apply_delta(copy.deepcopy(base), layers, entry["layers"]), ids, 4)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0)
        torch.testing.assert_close(approx[name], want, atol=2e-2, rtol=0)
        torch.testing.assert_close(approx_low[name], want, atol=2e-2, rtol=0)
        # and the quantized expert is not simply the fine-tune itself
        assert (got[name] - hf_logits(experts[name], ids, 4)).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{}, {"max_merged": 0}, {"max_merged": 0, "backend": "dense"},
                                {"max_merged": 1, "backend": "int4"}, {"max_merged": 0, "backend": "int4"},
                                {"max_batch": 2}])
def test_mixed_batch_greedy_equals_each_request_alone(models, quantized, smollm_tokenizer, kw):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer, **kw)
    experts = ["a", None, "b", "a", "c"]
    lengths = [8, 3, 6, 1, 5]  # sequences leave the batch at different steps
    reqs = [Request(prompt=PROMPTS[i % 4], expert=e, params=SamplingParams(max_tokens=n, temperature=0,
                                                                           ignore_eos=True))
            for i, (e, n) in enumerate(zip(experts, lengths, strict=True))]
    together = eng.generate(reqs)
    alone_engine = _engine(quantized, base, smollm_tokenizer, **kw)
    for r, got in zip(reqs, together, strict=True):
        alone = alone_engine.generate([Request(prompt=r.prompt, expert=r.expert, params=r.params)])[0]
        assert got.token_ids == alone.token_ids, r.expert
        assert got.finish_reason == "length" and len(got.token_ids) == r.params.max_tokens
    # experts really change the output
    assert len({tuple(c.token_ids) for c in together[:3]}) == 3


def test_requests_join_and_leave_between_steps(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    first = Request(prompt=PROMPTS[0], expert="a", params=GREEDY)
    late = Request(prompt=PROMPTS[1], expert="b", params=SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    eng.add_request(first)
    events = eng.step() + eng.step()
    assert eng.num_running == 1
    eng.add_request(late)
    done = {}
    while eng.has_unfinished():
        for ev in eng.step():
            events.append(ev)
            if ev.completion:
                done[ev.request_id] = ev.completion
    alone = _engine(quantized, base, smollm_tokenizer)
    for r in (first, late):
        assert done[r.request_id].token_ids == alone.generate([Request(prompt=r.prompt, expert=r.expert,
                                                                       params=r.params)])[0].token_ids
    streamed = "".join(e.text for e in events if e.request_id == first.request_id)
    assert streamed == done[first.request_id].text


def test_stream_concatenates_to_the_completion(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    events = list(eng.stream(Request(prompt=PROMPTS[2], expert="c", params=params)))
    assert events[-1].finished and all(not e.finished for e in events[:-1])
    comp = events[-1].completion
    assert "".join(e.text for e in events) == comp.text
    assert [t for e in events for t in e.token_ids] == comp.token_ids
    assert comp.usage.completion_tokens == 12 and comp.usage.prompt_tokens > 0
    assert comp.text == smollm_tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = eng.generate([Request(prompt=PROMPTS[0], expert="a", params=p)])[0]
    noise = [Request(prompt=PROMPTS[i], expert="b", params=SamplingParams(max_tokens=10, seed=i)) for i in range(3)]
    mixed = eng.generate([*noise, Request(prompt=PROMPTS[0], expert="a", params=p)])[-1]
    assert mixed.token_ids == alone.token_ids
    other = eng.generate([Request(prompt=PROMPTS[0], expert="a", params=SamplingParams(max_tokens=10, seed=8,
                                                                                      ignore_eos=True))])[0]
    assert other.token_ids != alone.token_ids
    tiny_p = SamplingParams(max_tokens=6, temperature=1.0, top_p=1e-6, seed=3, ignore_eos=True)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert (eng.generate(Request(prompt=PROMPTS[1], expert="b", params=tiny_p))[0].token_ids
            == eng.generate(Request(prompt=PROMPTS[1], expert="b", params=greedy))[0].token_ids)


def test_stop_strings_end_generation_and_are_not_returned(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    full = eng.generate(Request(prompt=PROMPTS[3], expert="a", params=SamplingParams(max_tokens=12, temperature=0,
                                                                                     ignore_eos=True)))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = eng.generate(Request(prompt=PROMPTS[3], expert="a",
                               params=SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_chat_messages_use_the_chat_template(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    msgs = [{"role": "user", "content": "Say something."}]
    comp = eng.generate(Request(messages=msgs, expert="b", params=GREEDY))[0]
    rendered = smollm_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert comp.usage.prompt_tokens == len(smollm_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    same = eng.generate(Request(prompt=rendered, expert="b", params=GREEDY))[0]
    assert same.token_ids == comp.token_ids


def test_residency_budget_evicts_least_recently_used_and_measures_loads(models, quantized, smollm_tokenizer):
    base, _ = models
    one = max(quantized.total_bytes(n) for n in quantized.experts)
    with pytest.raises(BudgetError, match="smaller than one expert"):
        _engine(quantized, base, smollm_tokenizer, max_resident_bytes=one - 1)
    probe = _engine(quantized, base, smollm_tokenizer, backend="reference")  # packed deltas only, no dense cache
    probe.pool.pin("a")
    held = probe.pool.resident_bytes()  # in memory: a little more than on disk (float32 salient columns)
    assert one <= held < 2 * one
    eng = _engine(quantized, base, smollm_tokenizer, max_resident_bytes=int(2.5 * held), backend="reference")
    reference = _engine(quantized, base, smollm_tokenizer)
    for name in ["a", "b", "c", "a"]:
        r = Request(prompt=PROMPTS[0], expert=name, params=GREEDY)
        assert eng.generate(r)[0].token_ids == reference.generate(r)[0].token_ids
    snap = eng.pool.snapshot()
    assert snap["resident"] == ["c", "a"]  # least recently used first
    assert snap["experts"]["a"]["loads"] == 2 and snap["experts"]["a"]["evictions"] == 1
    assert snap["experts"]["b"]["evictions"] == 1
    assert all(ms > 0 for ms in snap["experts"]["a"]["load_ms"])
    eng.pool.pin("b")  # evicts c (LRU) to make room
    eng.generate(Request(prompt=PROMPTS[0], expert="c", params=GREEDY))  # evicts a, not the pinned b
    assert sorted(eng.pool.resident()) == ["b", "c"]
    assert eng.pool.resident_bytes() <= int(2.5 * held)


def test_a_batch_waits_while_the_budget_is_full_of_busy_experts(models, quantized, smollm_tokenizer):
    base, _ = models
    one = max(quantized.total_bytes(n) for n in quantized.experts)
    eng = _engine(quantized, base, smollm_tokenizer, max_resident_bytes=int(1.5 * one), backend="reference")
    reqs = [Request(prompt=PROMPTS[i], expert=e, params=GREEDY) for i, e in enumerate(["a", "b", "a"])]
    outs = eng.generate(reqs)
    ref = _engine(quantized, base, smollm_tokenizer)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref.generate(reqs)]


def test_bad_requests_get_specific_errors(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer, max_context=64)
    with pytest.raises(UnknownModelError, match="no expert 'nope'"):
        eng.add_request(Request(prompt="x", expert="nope"))
    with pytest.raises(InvalidRequestError, match="non-empty"):
        eng.add_request(Request(prompt=""))
    with pytest.raises(InvalidRequestError, match="exactly one"):
        eng.add_request(Request())
    with pytest.raises(InvalidRequestError, match="messages"):
        eng.add_request(Request(messages=[{"role": "robot", "content": "hi"}]))
    with pytest.raises(ContextLengthError, match="maximum context length is 64"):
        eng.add_request(Request(prompt="word " * 100))
    with pytest.raises(ContextLengthError):
        eng.add_request(Request(prompt="x" * 10_000_000))  # refused without tokenizing 10 MB
    with pytest.raises(ContextLengthError):
        eng.add_request(Request(prompt="hi", params=SamplingParams(max_tokens=64)))
    with pytest.raises(UnknownModelError, match="no expert 'auto'"):  # routing is the front's (meswitch.front)
        eng.add_request(Request(prompt="hi", expert="auto"))
    capped = _engine(quantized, base, smollm_tokenizer, max_prompt_tokens=5)
    with pytest.raises(PromptTooLongError, match="at most 5 prompt tokens"):
        capped.add_request(Request(prompt="word " * 6, params=SamplingParams(max_tokens=1)))
    capped.add_request(Request(prompt="word word", params=SamplingParams(max_tokens=1)))
    for bad in [{"max_tokens": 0}, {"max_tokens": -3}, {"temperature": -1}, {"top_p": 0},
                {"top_p": float("nan")}, {"stop": [""]}, {"seed": "x"}]:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**bad)
    assert not eng.has_unfinished()


def test_a_broken_expert_fails_its_request_only(models, quantized, tmp_path, smollm_tokenizer):
    base, experts = models
    store = make_store(tmp_path / "s", base, experts, method="salient", bits=2, k=8)
    eng = _engine(store, base, smollm_tokenizer)
    path = store.path / store.expert_meta("b")["file"]
    path.write_bytes(path.read_bytes()[:-100])  # truncated on disk after the engine started
    reqs = [Request(prompt=PROMPTS[i], expert=e, params=GREEDY) for i, e in enumerate(["a", "b", None])]
    outs = eng.generate(reqs)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "CorruptStoreError" in outs[1].error and outs[1].token_ids == []
    assert eng.stats()["errors"] == 1


def test_abort_cancels_a_running_request(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    r = Request(prompt=PROMPTS[0], expert="a", params=SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    keep = Request(prompt=PROMPTS[1], expert="b", params=GREEDY)
    eng.add_request(r)
    eng.add_request(keep)
    eng.step()
    eng.abort(r.request_id)
    done = {}
    while eng.has_unfinished():
        done.update({e.request_id: e.completion for e in eng.step() if e.completion})
    assert done[r.request_id].finish_reason == "cancelled" and len(done[r.request_id].token_ids) < 50
    assert done[keep.request_id].finish_reason == "length"
    assert eng.cache.free_slots == eng.config.max_batch


def test_store_of_another_base_is_refused(quantized, smollm_tokenizer):
    with pytest.raises(BaseMismatchError, match="another base model"):
        Engine(quantized, tiny_base(seed=9), smollm_tokenizer)


def test_unsupported_delta_names_fail_at_load(models, tmp_path, smollm_tokenizer):
    base, experts = models
    layers, meta = expert_layers(base, experts["a"])
    layers["model.rotary.inv_freq"] = {"delta": torch.zeros(4)}
    meta["model.rotary.inv_freq"] = {"method": "dense", "bits": 32, "shape": [4], "salient": 0}
    store = DeltaStore.create(tmp_path / "s", *_fp(base))
    store.add_expert("odd", layers, meta, {})
    eng = _engine(store, base, smollm_tokenizer)
    out = eng.generate(Request(prompt="hi", expert="odd", params=GREEDY))[0]
    assert out.finish_reason == "error" and "inv_freq" in out.error


def _fp(model):
    from meswitch.store import base_info, fingerprint_model

    return fingerprint_model(model), base_info(model)


def test_extreme_sampling_values_never_break_the_batch(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    greedy = eng.generate(Request(prompt=PROMPTS[0], expert="a", params=GREEDY))[0].token_ids
    odd = [SamplingParams(max_tokens=8, temperature=5e-324, ignore_eos=True),
           SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-300, seed=1, ignore_eos=True),
           SamplingParams(max_tokens=8, temperature=1e6, seed=2, ignore_eos=True)]
    outs = eng.generate([Request(prompt=PROMPTS[0], expert="a", params=p) for p in odd])
    assert [o.finish_reason for o in outs] == ["length"] * 3
    assert outs[0].token_ids == greedy and outs[1].token_ids == greedy  # both reduce to the top token


def test_describe_request_reports_expert_and_the_route_it_was_given(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    route = Route("a", "code", 0.93, False)
    rid = eng.add_request(Request(prompt="def g(): pass", expert="a", route=route, params=GREEDY))
    assert eng.describe_request(rid) == ("a", route)
    assert eng.describe_request(eng.add_request(Request(prompt="x", params=GREEDY))) == (None, None)
    with pytest.raises(KeyError):
        eng.describe_request("nope")
    done = {}
    while eng.has_unfinished():
        done.update({e.request_id: e.completion for e in eng.step() if e.completion})
    assert (done[rid].expert, done[rid].route) == ("a", route)
    with pytest.raises(InvalidRequestError, match="its route chose 'a'"):
        eng.add_request(Request(prompt="x", expert="b", route=route, params=GREEDY))


def test_a_request_whose_sampling_fails_ends_alone(models, quantized, smollm_tokenizer, monkeypatch):
    import meswitch.engine.engine as engine_mod

    real = engine_mod.sample

    def flaky(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("probability tensor contains inf or nan")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_mod, "sample", flaky)
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer)
    bad = SamplingParams(max_tokens=4, temperature=1.0, seed=666)
    outs = eng.generate([Request(prompt=PROMPTS[0], expert="a", params=GREEDY),
                         Request(prompt=PROMPTS[1], expert="b", params=bad)])
    assert [o.finish_reason for o in outs] == ["length", "error"]
    assert len(outs[0].token_ids) == GREEDY.max_tokens


def test_an_expert_alone_for_merge_after_steps_gets_merged_weights(models, quantized, smollm_tokenizer):
    base, _ = models
    eng = _engine(quantized, base, smollm_tokenizer, max_merged=1, merge_after=3)
    exact = _engine(quantized, base, smollm_tokenizer, max_merged=0, backend="reference")
    r = Request(prompt=PROMPTS[0], expert="b", params=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert eng.generate(r)[0].token_ids == exact.generate(r)[0].token_ids
    snap = eng.pool.snapshot()
    assert snap["merged"] == ["b"] and snap["experts"]["b"]["merges"] == 1 and snap["merged_bytes"] > 0
    eng.generate(Request(prompt=PROMPTS[1], expert="c", params=r.params))  # c replaces b (max_merged=1)
    assert eng.pool.merged() == ["c"]
    mixed = [Request(prompt=PROMPTS[i], expert=e, params=r.params) for i, e in enumerate(["c", "a", None])]
    assert [o.token_ids for o in eng.generate(mixed)] == [o.token_ids for o in exact.generate(mixed)]
    short = _engine(quantized, base, smollm_tokenizer, max_merged=1, merge_after=50)
    short.generate(r)
    assert short.pool.merged() == []  # 10 solo steps are not enough to be worth a merge
