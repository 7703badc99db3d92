"""Log-probabilities, echo, token-id prompts and n > 1 through the real server and the official client.

Every expected value comes from transformers' own forward on the same weights (the tiny base, and
each expert rebuilt as ``perturbed(base, i + 1)``: its store is lossless), never from the server.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from tests.engine_helpers import EXPERTS, perturbed
from tests.server_helpers import KEY, tiny_served

ATOL = 1e-4
MAX_CONTEXT = 256  # the tiny base's max_position_embeddings


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm_tokenizer):
    with tiny_served(tmp_path_factory.mktemp("logprobs"), smollm_tokenizer) as s:
        yield s


@pytest.fixture(scope="module")
def hf(served):
    """name -> the transformers model the expert's lossless deltas reproduce (``base`` too)."""
    base = served.tiny[0]
    return {"base": base, **{n: perturbed(base, i + 1) for i, n in enumerate(EXPERTS)}}


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), V]``: row ``j`` is log_softmax of the logits after ``ids[: j + 1]``."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """``n`` greedy tokens after ``ids`` and the log-probabilities ``[len(ids) + n, V]`` along the way."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(hf_logprobs(model, ids)[-1].argmax()))
    return ids, hf_logprobs(model, ids)


def check_legacy(lp, ids: list[int], ref: torch.Tensor, tok, k: int) -> None:
    """``lp`` (legacy shape, echoed: it starts at the prompt's first token) holds ``ids``, scored by ``ref``
    (``hf_logprobs`` of ``ids``): each token, its log-probability and the keys of its ``k`` alternatives."""
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(ref[j - 1, ids[j]].item(), abs=ATOL), j
        want_top = {tok.decode([t]) for t in ref[j - 1].topk(k).indices.tolist()} | {tok.decode([ids[j]])}
        assert set(lp.top_logprobs[j]) == want_top
    assert lp.text_offset[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))


def test_completion_logprobs_equal_transformers_with_another_expert_in_flight(served, hf, client, smollm_tokenizer):
    tok = smollm_tokenizer
    other_done = threading.Event()
    started = threading.Event()

    def other() -> None:  # a long greedy stream for another expert, in the same batches
        for _ in client.completions.create(model="math", prompt="Once upon a time", max_tokens=150, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
            started.set()
        other_done.set()

    t = threading.Thread(target=other)
    t.start()
    assert started.wait(30)
    prompt = "def add(a, b): return"
    resp = client.completions.create(model="code", prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True,
                                     extra_body={"ignore_eos": True})
    in_flight = not other_done.is_set()
    t.join(60)
    assert in_flight, "the other expert's request finished first: no mixed batch"
    ids = tok(prompt)["input_ids"]
    full, ref = hf_greedy(hf["code"], ids, 4)
    choice = resp.choices[0]
    assert choice.text == prompt + tok.decode(full[len(ids):])
    check_legacy(choice.logprobs, full, ref, tok, 3)
    # the top values are the model's too
    for j in range(1, len(full)):
        top = choice.logprobs.top_logprobs[j]
        for t_id in ref[j - 1].topk(3).indices.tolist():
            assert top[tok.decode([t_id])] == pytest.approx(ref[j - 1, t_id].item(), abs=ATOL)


def test_echo_with_max_tokens_0_scores_every_prompt_token_and_token_ids_equal_text(hf, client, smollm_tokenizer):
    tok = smollm_tokenizer
    texts = ["The cat sat on the mat.", "def f(x): return x * 2"]
    ids = [tok(t)["input_ids"] for t in texts]
    by_ids = client.completions.create(model="general", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    by_text = client.completions.create(model="general", prompt=texts, max_tokens=0, echo=True, logprobs=0)
    assert [c.index for c in by_ids.choices] == [0, 1]
    assert by_ids.usage.completion_tokens == 0 and by_ids.usage.prompt_tokens == sum(map(len, ids))
    for i, p in enumerate(ids):
        a, b = by_ids.choices[i], by_text.choices[i]
        assert a.finish_reason == "length" and a.text == tok.decode(p) and b.text == texts[i]
        assert len(a.logprobs.token_logprobs) == len(p)
        check_legacy(a.logprobs, p, hf_logprobs(hf["general"], p), tok, 0)
        assert a.logprobs.tokens == b.logprobs.tokens and a.logprobs.token_logprobs == b.logprobs.token_logprobs
    one = client.completions.create(model="general", prompt=ids[1], max_tokens=0, echo=True, logprobs=0)
    assert one.choices[0].logprobs.token_logprobs == by_ids.choices[1].logprobs.token_logprobs


def test_chat_logprobs_equal_transformers(hf, client, smollm_tokenizer):
    tok = smollm_tokenizer
    msgs = [{"role": "user", "content": "Write a haiku about rain."}]
    resp = client.chat.completions.create(model="math", messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    full, ref = hf_greedy(hf["math"], ids, 5)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for j, entry in enumerate(content):
        pos, tid = len(ids) + j - 1, full[len(ids) + j]
        assert entry.token == tok.decode([tid]) and entry.logprob == pytest.approx(ref[pos, tid].item(), abs=ATOL)
        assert bytes(entry.bytes).decode() == entry.token
        want = ref[pos].topk(2)
        assert [a.token for a in entry.top_logprobs] == [tok.decode([t]) for t in want.indices.tolist()]
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(want.values.tolist(), abs=ATOL)


def test_streaming_chunks_carry_the_same_logprobs(client):
    args = {"model": "code", "prompt": "for i in range(10):", "max_tokens": 8, "temperature": 0, "logprobs": 2,
            "echo": True, "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**args).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **args) if c.choices]
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert "".join(c.choices[0].text for c in chunks) == plain.text
    assert sum((x.tokens for x in lps), []) == plain.logprobs.tokens
    assert sum((x.token_logprobs for x in lps), []) == plain.logprobs.token_logprobs
    assert sum((x.text_offset for x in lps), []) == plain.logprobs.text_offset
    chat = {"model": "math", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 1, "extra_body": {"ignore_eos": True}}
    want = client.chat.completions.create(**chat).choices[0].logprobs.content
    got = [e for c in client.chat.completions.create(stream=True, **chat) if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in got] == [(e.token, e.logprob) for e in want]


def test_n_choices_are_ordered_and_reproducible_with_a_seed(client):
    args = {"model": "general", "prompt": "Tell me a story", "max_tokens": 8, "temperature": 1.0, "seed": 7,
            "extra_body": {"ignore_eos": True}}
    a = client.completions.create(n=3, **args)
    b = client.completions.create(n=3, **args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert client.completions.create(**args).choices[0].text == a.choices[0].text
    assert a.usage.completion_tokens == 24 and a.usage.prompt_tokens == b.usage.prompt_tokens
    many = client.completions.create(model="general", prompt=["alpha", "beta"], n=2, max_tokens=1, echo=True)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text[:4] for c in many.choices] == ["alph", "alph", "beta", "beta"]
    chat = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = [c for c in client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                                          n=2, max_tokens=4, seed=3, stream=True) if c.choices]
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i)
        assert text == chat.choices[i].message.content


def test_auto_and_the_base_return_the_answering_models_logprobs(hf, client, smollm_tokenizer):
    tok = smollm_tokenizer
    prompt = "What is 12 plus 30?"  # digits: the keyword router picks math
    ids = tok(prompt)["input_ids"]
    for stream in (False, True):
        args = {"model": "auto", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
        if stream:
            chunks = [c for c in client.completions.create(stream=True, **args) if c.choices]
            lps = sum((c.choices[0].logprobs.token_logprobs for c in chunks if c.choices[0].logprobs), [])
            expert = chunks[-1].model_extra["meswitch"]["expert"]
        else:
            resp = client.completions.create(**args)
            lps, expert = resp.choices[0].logprobs.token_logprobs, resp.model_extra["meswitch"]["expert"]
        assert expert == "math"
        ref = hf_logprobs(hf["math"], ids)
        assert lps[0] is None
        assert lps[1:] == pytest.approx([ref[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=ATOL)
        assert lps[1:] != pytest.approx([hf_logprobs(hf["general"], ids)[j - 1, ids[j]].item()
                                         for j in range(1, len(ids))], abs=ATOL)
    assert "base" in {m.id for m in client.models.list().data}
    base = client.completions.create(model="base", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    ref = hf_logprobs(hf["base"], ids)
    assert base.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [ref[j - 1, ids[j]].item() for j in range(1, len(ids))], abs=ATOL)


OK = {"model": "code", "prompt": "hello", "max_tokens": 2}
CHAT_OK = {"model": "code", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(("path", "body", "code", "param"), [
    ("/v1/completions", {**OK, "logprobs": 21}, "invalid_value", "logprobs"),
    ("/v1/completions", {**OK, "logprobs": -1}, "invalid_value", "logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "logprobs": True, "top_logprobs": 21}, "invalid_value", "top_logprobs"),
    ("/v1/chat/completions", {**CHAT_OK, "top_logprobs": 2}, "invalid_value", "top_logprobs"),
    ("/v1/completions", {**OK, "n": 9}, "invalid_value", "n"),
    ("/v1/chat/completions", {**CHAT_OK, "n": 9}, "invalid_value", "n"),
    ("/v1/completions", {**OK, "prompt": ["a"] * 10, "n": 2}, "invalid_value", "prompt"),
    ("/v1/completions", {**OK, "prompt": [5] * (MAX_CONTEXT + 1), "max_tokens": 0, "echo": True},
     "context_length_exceeded", "prompt"),
    ("/v1/completions", {**OK, "prompt": [1, 49152]}, "invalid_value", "prompt"),
    ("/v1/completions", {**OK, "prompt": [[1, 2], [-3]]}, "invalid_value", "prompt"),
    ("/v1/completions", {**OK, "prompt": []}, "invalid_value", "prompt"),
    ("/v1/completions", {**OK, "prompt": [[1], []]}, "invalid_value", "prompt.1"),
    ("/v1/completions", {**OK, "prompt": ["a", ""]}, "invalid_value", "prompt.1"),
    ("/v1/completions", {**OK, "max_tokens": 0}, "invalid_value", "max_tokens"),
    ("/v1/completions", {**OK, "model": "auto", "prompt": [1, 2, 3]}, "invalid_value", "prompt"),
])
def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_stays_up(served, client, path, body, code, param):
    with httpx.Client(base_url=served.url, headers={"authorization": f"Bearer {KEY}"}, timeout=30) as c:
        resp = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert (err["code"], err["param"]) == (code, param), err
        assert err["message"]
    assert client.completions.create(model="code", prompt="ok", max_tokens=1).choices[0].finish_reason


def test_echo_streams_the_prompt_first(client):
    chunks = [c for c in client.completions.create(model="code", prompt="abc", max_tokens=3, echo=True, stream=True,
                                                   temperature=0) if c.choices]
    assert chunks[0].choices[0].text.startswith("abc")
    none = [c for c in client.completions.create(model="code", prompt="abc", max_tokens=0, echo=True, stream=True)
            if c.choices]
    assert [c.choices[0].text for c in none] == ["abc"] and none[-1].choices[0].finish_reason == "length"
