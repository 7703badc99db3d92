"""The OpenAI-compatible server: a real uvicorn on loopback, driven by the official ``openai`` client and httpx.

The engine is a tiny random Llama (hidden 64) with three perturbed experts and a keyword router
stand-in, so every test runs in well under a second once the module's server is up.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from meswitch.engine import Engine, Request, SamplingParams
from meswitch.engine.background import BackgroundEngine
from meswitch.front import Front
from meswitch.server import ServerConfig, create_app, engine_app
from meswitch.server.middleware import key_matches
from tests.engine_helpers import EXPERTS, KeywordRouter, build_tiny, make_engine
from tests.server_helpers import KEY, LiveServer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("server"))


ROUTER = KeywordRouter()


@pytest.fixture(scope="module")
def served(tiny, smollm_tokenizer) -> Iterator[tuple[LiveServer, BackgroundEngine]]:
    bg = BackgroundEngine(make_engine(tiny, smollm_tokenizer, max_batch=4), max_pending=6)
    config = ServerConfig(api_key=KEY, max_tokens=200, max_pending=6, max_body_bytes=256 * 1024, body_timeout_s=1.5)
    front = Front(bg.experts, ROUTER, max_queued=6)
    with bg, LiveServer(create_app(bg, front, config)) as server:
        yield server, bg
    front.close()


@pytest.fixture(scope="module")
def reference(tiny, smollm_tokenizer) -> Engine:
    """A second engine on the same store, called directly: what the server should reproduce."""
    return make_engine(tiny, smollm_tokenizer)


@pytest.fixture()
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def http(served, key: str | None = KEY, **kw) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=served[0].url, headers=headers, timeout=kw.pop("timeout", 30), **kw)


def engine_idle(bg: BackgroundEngine, timeout: float = 10) -> dict:
    """Wait until nothing is running or waiting in the engine; its stats then."""
    deadline = time.monotonic() + timeout
    while True:
        stats = bg.call(lambda e: e.stats()).result(5)
        if (stats["running"] == 0 and stats["waiting"] == 0 and bg.pending == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


GREEDY = {"temperature": 0, "max_tokens": 12}
CHAT = [{"role": "user", "content": "What is 7 times 6?"}]


# ---- the happy paths, through the official client -------------------------------------------------


def test_models_lists_every_expert_and_auto(client):
    assert sorted(m.id for m in client.models.list().data) == sorted([*EXPERTS, "auto"])


def test_chat_matches_the_engine_called_directly(client, reference):
    raw = client.chat.completions.with_raw_response.create(model="code", messages=CHAT, **GREEDY)
    resp = raw.parse()
    want = reference.generate(Request(messages=CHAT, expert="code", params=SamplingParams(**GREEDY)))[0]
    assert resp.choices[0].message.content == want.text
    assert resp.choices[0].finish_reason == want.finish_reason
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (want.usage.prompt_tokens,
                                                                         want.usage.completion_tokens)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert raw.headers["x-meswitch-expert"] == "code"
    assert resp.model_extra["meswitch"]["expert"] == "code"


def test_completion_matches_the_engine_called_directly(client, reference):
    prompt = "def add(a, b):"
    resp = client.completions.create(model="general", prompt=prompt, **GREEDY)
    want = reference.generate(Request(prompt=prompt, expert="general", params=SamplingParams(**GREEDY)))[0]
    assert resp.choices[0].text == want.text
    assert resp.usage.completion_tokens == want.usage.completion_tokens


def test_chat_stream_concatenates_to_the_plain_answer(client):
    args = {"model": "math", "messages": CHAT, "temperature": 0, "max_tokens": 20,
            "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed


def test_a_vanishing_temperature_or_top_p_is_greedy_not_a_crash(client):
    args = {"model": "math", "prompt": "What is 7 times 6?", "max_tokens": 6}
    greedy = client.completions.create(temperature=0, **args).choices[0].text
    assert client.completions.create(temperature=5e-324, **args).choices[0].text == greedy
    assert client.completions.create(temperature=1, top_p=5e-324, **args).choices[0].text == greedy  # top token only


def test_completion_stream(client):
    args = {"model": "code", "prompt": "def add(a, b):", "temperature": 0, "max_tokens": 10}
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


@pytest.mark.parametrize(("question", "expert", "confidence"), [
    ("What is 12 plus 30?", "math", 0.875), ("Please write def main() in Python", "code", 0.75),
    ("How are you today?", "general", 0.5)])
def test_auto_routes_and_reports_the_expert(client, question, expert, confidence):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": question}], **GREEDY)
    assert raw.headers["x-meswitch-expert"] == expert
    info = raw.parse().model_extra["meswitch"]
    assert (info["expert"], info["domain"], info["confidence"]) == (expert, expert, confidence)
    stream = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": question}], stream=True, **GREEDY)
    assert stream.headers["x-meswitch-expert"] == expert
    first = next(iter(stream.parse()))
    assert first.model_extra["meswitch"]["expert"] == expert


def test_auto_without_a_router_is_a_clear_400(tiny, smollm_tokenizer):
    app = engine_app(make_engine(tiny, smollm_tokenizer))
    with LiveServer(app) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        assert sorted(m.id for m in c.models.list().data) == sorted(EXPERTS)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="auto", messages=CHAT, max_tokens=2)
        assert e.value.body["code"] == "routing_unavailable" and e.value.body["param"] == "model"


def test_auto_is_routed_on_the_last_user_message_off_the_engine_thread(client):
    messages = [{"role": "system", "content": "Answer in 3 words."}, {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "Now def twice(x): ..."}]
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages, **GREEDY)
    assert raw.headers["x-meswitch-expert"] == "code"
    text, thread = ROUTER.seen[-1]
    assert text == "Now def twice(x): ..."
    assert thread.startswith("meswitch-route")  # the front's thread: neither the event loop nor the engine's


# ---- bad input: a specific 4xx in the OpenAI shape, never a 500 -------------------------------------


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


OK_CHAT = {"model": "math", "messages": CHAT, "max_tokens": 2}


@pytest.mark.parametrize(("path", "body", "status", "code", "param"), [
    ("/v1/chat/completions", b'{"model": "math", "messages": [', 400, "invalid_json", None),
    ("/v1/chat/completions", b"not json at all", 400, "invalid_json", None),
    ("/v1/chat/completions", b"\xd2\xea\x94\x1b", 400, "invalid_json", None),
    ("/v1/chat/completions", {**OK_CHAT, "messages": "hello"}, 400, "invalid_type", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": "many"}, 400, "invalid_type", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": [1]}, 400, "invalid_type", "temperature"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "missing_required_parameter", "model"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "no-such-expert"}, 404, "model_not_found", "model"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": -5}, 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10**30}, 400, "max_tokens_too_large", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 190, "messages": [{"role": "user", "content": "hi " * 80}]},
     400, "context_length_exceeded", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "invalid_value", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": ""}]}, 400, "invalid_value",
     "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value",
     "messages.0.role"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 9}, 400, "invalid_value", "n"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": [""]}, 400, "invalid_value", "stop"),
    ("/v1/chat/completions", [1, 2, 3], 400, "invalid_type", None),
    ("/v1/completions", {"model": "math", "prompt": ""}, 400, "invalid_value", "prompt"),
    ("/v1/completions", {"model": "math", "prompt": []}, 400, "invalid_value", "prompt"),
])
def test_bad_input_gets_a_specific_4xx(served, path, body, status, code, param):
    with http(served) as c:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = c.post(path, content=content, headers={"content-type": "application/json"})
        assert resp.status_code == status, resp.text
        err = _error(resp)
        assert err["code"] == code, err
        if param is not None:
            assert err["param"] == param, err
        assert c.get("/health").status_code == 200


def test_bad_input_through_the_official_client(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="math", prompt="hi", max_tokens=-1)


def test_a_10_mb_prompt_is_rejected_with_413_before_it_is_read(served):
    prompt = "x" * (10 << 20)
    with http(served) as c:
        resp = c.post("/v1/completions", json={"model": "math", "prompt": prompt})
        assert resp.status_code == 413 and _error(resp)["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit applies while reading
            for _ in range(40):
                yield b"x" * 65536

        resp = c.post("/v1/completions", content=chunked())
        assert resp.status_code == 413 and _error(resp)["code"] == "request_too_large"
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize("key", [None, "wrong-key", KEY + "x", KEY[:-1]])
def test_a_wrong_api_key_is_401(served, key):
    with http(served, key=key) as c:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]:
            resp = c.request(method, path, json=OK_CHAT)
            assert resp.status_code == 401 and _error(resp)["type"] == "authentication_error"
        assert c.get("/health").status_code == 200  # health and metrics stay open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served[0].url + "/v1", api_key=key or "-", max_retries=0).models.list()


def test_key_comparison():
    assert key_matches(b"Bearer secret", b"secret")
    assert key_matches(b"bearer secret", b"secret")
    for header in [None, b"", b"secret", b"Bearer", b"Bearer secre", b"Bearer secret2", b"Basic secret"]:
        assert not key_matches(header, b"secret"), header


def _raw_post(port: int, body: bytes, delay: float, stall_after: int | None = None) -> bytes:
    """POST ``body`` one byte at a time (``delay`` s apart; stop sending after ``stall_after`` bytes)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head)
        for i in range(len(body) if stall_after is None else stall_after):
            s.sendall(body[i : i + 1])
            time.sleep(delay)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_body_sent_byte_by_byte_works_and_blocks_nobody(served, client):
    body = json.dumps(OK_CHAT).encode()
    result: dict[str, bytes] = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _raw_post(served[0].port, body, 0.01)))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    for _ in range(3):  # served while the slow body is still arriving
        client.chat.completions.create(model="general", messages=CHAT, max_tokens=2)
    assert t.is_alive() and time.monotonic() - t0 < len(body) * 0.01
    t.join(30)
    assert result["r"].startswith(b"HTTP/1.1 200"), result["r"][:200]


def test_a_stalled_body_times_out_with_408(served):
    body = json.dumps(OK_CHAT).encode()
    out = _raw_post(served[0].port, body, 0.0, stall_after=10)  # then waits for the answer
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    with http(served) as c:
        assert c.get("/health").status_code == 200


# ---- limits, cancellation, metrics -----------------------------------------------------------------


def test_overload_is_429_in_the_openai_shape(served):
    server, bg = served
    gate = threading.Event()
    blocked = bg.call(lambda e: gate.wait(30))  # hold the engine thread: submissions pile up
    results: list[int] = []
    with http(served) as c:
        threads = [threading.Thread(target=lambda: results.append(c.post("/v1/chat/completions", json=OK_CHAT)
                                                                  .status_code)) for _ in range(bg.max_pending)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while bg.pending < bg.max_pending and time.monotonic() < deadline:
            time.sleep(0.01)
        resp = c.post("/v1/chat/completions", json=OK_CHAT)
        gate.set()
        blocked.result(10)
        for t in threads:
            t.join(30)
    assert resp.status_code == 429 and _error(resp)["code"] == "overloaded"
    assert resp.headers["retry-after"] == "1"
    assert results == [200] * bg.max_pending
    assert engine_idle(bg)["running"] == 0


def test_a_client_disconnect_cancels_its_stream_and_frees_the_slot(served):
    server, bg = served
    before = engine_idle(bg)["generated_tokens"]
    body = {**OK_CHAT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http(served) as c, c.stream("POST", "/v1/chat/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
        gate = threading.Event()
        blocked = bg.call(lambda e: gate.wait(30))  # freeze the engine while the client leaves
        running = bg.call(lambda e: e.num_running)
    # the response is closed here: the connection is gone
    time.sleep(0.3)
    gate.set()
    blocked.result(10)
    assert running.result(10) == 1
    stats = engine_idle(bg)
    assert stats["running"] == 0 and bg.pending == 0
    assert stats["generated_tokens"] - before < 100  # cancelled, not run to its 200 tokens


def test_a_client_disconnect_cancels_a_plain_request(served):
    server, bg = served
    before = engine_idle(bg)["generated_tokens"]
    gate = threading.Event()
    blocked = bg.call(lambda e: gate.wait(30))  # the request stays in the inbox until the client is gone
    with http(served, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json={**OK_CHAT, "max_tokens": 200, "ignore_eos": True})
    time.sleep(0.3)
    gate.set()
    blocked.result(10)
    stats = engine_idle(bg)
    assert stats["running"] == 0 and bg.pending == 0
    assert stats["generated_tokens"] - before < 100


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_count_requests_tokens_routes_and_expert_loads(served, client):
    with http(served, key=None) as c:
        before = c.get("/metrics").text
        for q in ["What is 1 plus 2?", "What is 3 plus 4?"]:
            client.chat.completions.create(model="auto", messages=[{"role": "user", "content": q}], max_tokens=3,
                                           temperature=0, extra_body={"ignore_eos": True})
        resp = c.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    after = resp.text

    def delta(name: str, key: str) -> float:
        return _samples(after, name).get(key, 0) - _samples(before, name).get(key, 0)

    routed = 'meswitch_routing_decisions_total{expert="math",domain="math",fallback="false"}'
    assert delta("meswitch_routing_decisions_total", routed) == 2
    done = 'meswitch_requests_total{endpoint="chat",expert="math",finish_reason="length"}'
    assert delta("meswitch_requests_total", done) == 2
    assert delta("meswitch_generation_tokens_total", 'meswitch_generation_tokens_total{expert="math"}') == 6
    assert delta("meswitch_time_to_first_token_seconds_count",
                 'meswitch_time_to_first_token_seconds_count{expert="math"}') == 2
    assert _samples(after, "meswitch_expert_loads_total")['meswitch_expert_loads_total{expert="math"}'] >= 1
    assert _samples(after, "meswitch_expert_cache_hits_total")['meswitch_expert_cache_hits_total{expert="math"}'] >= 1
    assert _samples(after, "meswitch_queue_waiting") == {"meswitch_queue_waiting": 0}
    ok = 'meswitch_http_responses_total{path="/v1/chat/completions",status="200"}'
    assert delta("meswitch_http_responses_total", ok) == 2


def test_unknown_routes_and_methods_are_openai_errors(served):
    with http(served) as c:
        assert _error(c.get("/v1/nothing"))["code"] == "not_found"
        resp = c.get("/v1/chat/completions")
        assert resp.status_code == 405 and _error(resp)["code"] == "method_not_allowed"


# ---- the `meswitch serve` command ------------------------------------------------------------------


def test_serve_command_calls_serve_with_its_flags_and_the_configs_defaults(monkeypatch):
    from meswitch.cli import main
    from meswitch.engine import EngineConfig
    from meswitch.server.config import DEFAULT_HOST, DEFAULT_PORT

    calls: list[dict] = []
    monkeypatch.setattr("meswitch.server.app.serve", lambda store, **kw: calls.append({"store": store, **kw}))
    monkeypatch.delenv("MESWITCH_API_KEY", raising=False)
    assert main(["serve", "STORE"]) == 0
    plain = calls[-1]
    assert (str(plain["store"]), plain["host"], plain["port"], plain["router"]) == ("STORE", DEFAULT_HOST,
                                                                                   DEFAULT_PORT, True)
    assert plain["config"] == ServerConfig()
    assert plain["engine_config"] == EngineConfig(max_waiting=ServerConfig.max_pending)
    assert main(["serve", "STORE", "--host", "0.0.0.0", "--port", "9001", "--api-key", "k", "--base", "B",
                 "--max-concurrency", "5", "--max-batch", "3", "--max-context", "128", "--max-prompt-tokens", "64",
                 "--max-tokens", "32", "--max-body-bytes", "4096", "--body-timeout", "2.5",
                 "--max-resident-bytes", "1000", "--no-router", "--log-level", "warning"]) == 0
    given = calls[-1]
    assert (given["host"], given["port"], str(given["base"]), given["router"], given["log_level"]) == (
        "0.0.0.0", 9001, "B", False, "warning")
    assert given["config"] == ServerConfig(api_key="k", max_tokens=32, max_pending=5, max_body_bytes=4096,
                                           body_timeout_s=2.5)
    assert given["engine_config"] == EngineConfig(max_batch=3, max_context=128, max_prompt_tokens=64, max_waiting=5,
                                                  max_resident_bytes=1000)
