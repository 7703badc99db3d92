"""meswitch on Ray Serve: a local Ray cluster on loopback, two engine replicas, the official ``openai`` client.

The store is the tiny random Llama of the server tests (three perturbed experts, a keyword router
stand-in) with K=2 experts per replica, so Ray Serve's multiplexing has to spread the experts over
both replicas. Checked: the same endpoints, errors and greedy answers as the single-process server;
both replicas answer; a killed replica is restarted by Ray and traffic goes on, with requests caught
by the kill ending in a clean error, never a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="the `ray` extra is not installed (pip install -e '.[ray]')")

import ray  # noqa: E402

from meswitch.engine import Completion, Engine, EngineConfig, Request, StreamEvent, Usage  # noqa: E402
from meswitch.engine.errors import UnknownModelError  # noqa: E402
from meswitch.front import Front  # noqa: E402
from meswitch.model.checkpoint import save_checkpoint  # noqa: E402
from meswitch.ray_app import RayAppConfig  # noqa: E402
from meswitch.ray_app.launch import deploy  # noqa: E402
from meswitch.ray_app.messages import Accepted  # noqa: E402
from meswitch.ray_app.remote import RemoteEngine  # noqa: E402
from meswitch.server import ServerConfig, ThreadedServer, engine_app  # noqa: E402
from tests.engine_helpers import EXPERTS, KeywordRouter, make_store, perturbed, tiny_base  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GREEDY = {"temperature": 0, "max_tokens": 12}
QUESTIONS = ["What is 12 plus 30?", "Please write def main() in Python", "How are you today?",
             "What is 7 times 6?", "def add(a, b): return what?", "Tell me about the sea."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm_tokenizer) -> Path:
    """A tiny store of three experts whose manifest records a saved base checkpoint (what replicas load)."""
    root = tmp_path_factory.mktemp("ray")
    base = tiny_base()
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    store = make_store(root / "store", base, {n: perturbed(base, i + 1) for i, n in enumerate(EXPERTS)})
    store.set_extra("base_path", str(root / "base"))
    return root / "store"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(saved):
    """The Ray Serve application on a fresh local cluster: 2 replicas, 2 experts each."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_SERVE_LOG_TO_STDERR": "0"}
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False,
             runtime_env={"env_vars": env}, logging_level="warning")
    try:
        config = RayAppConfig(store=str(saved), replicas=2, experts_per_replica=2, replica_cpus=1, torch_threads=1,
                              max_batch=4, max_tokens=200, max_ongoing_requests=8, health_check_period_s=1.0)
        yield deploy(config, port=free_port(), router=KeywordRouter())
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local_url(saved):
    """The single-process server on the same store: what the Ray application must reproduce."""
    engine = Engine.from_store(saved, config=EngineConfig(max_batch=4))
    with ThreadedServer(engine_app(engine, KeywordRouter(), ServerConfig(max_tokens=200))) as server:
        yield server.url


def client(url: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)


def ask(url: str, kind: str, model: str, text: str, **kw) -> dict:
    """One request through the openai client: the answer, its usage and the response headers."""
    c = client(url)
    if kind == "chat":
        raw = c.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": text}],
                                                          **GREEDY, **kw)
        r = raw.parse()
        answer = r.choices[0].message.content
    elif kind == "completion":
        raw = c.completions.with_raw_response.create(model=model, prompt=text, **GREEDY, **kw)
        r = raw.parse()
        answer = r.choices[0].text
    else:  # a streamed chat
        with c.chat.completions.with_streaming_response.create(
                model=model, messages=[{"role": "user", "content": text}], stream=True, **GREEDY, **kw) as raw:
            chunks = list(raw.parse())
        text_out = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        return {"text": text_out, "finish": finish, "expert": raw.headers["x-meswitch-expert"],
                "replica": raw.headers.get("x-meswitch-replica"), "route": chunks[-1].model_extra.get("meswitch")}
    return {"text": answer, "finish": r.choices[0].finish_reason, "usage": r.usage.model_dump(),
            "expert": raw.headers["x-meswitch-expert"], "replica": raw.headers.get("x-meswitch-replica"),
            "route": r.model_extra.get("meswitch")}


def mixed_traffic() -> list[tuple[str, str, str]]:
    calls = [("chat", "auto", q) for q in QUESTIONS]
    calls += [("completion", e, "def add(a, b):") for e in EXPERTS]
    calls += [("stream", "auto", QUESTIONS[0]), ("stream", "code", QUESTIONS[1])]
    return calls


def test_models_and_health(ray_url, local_url):
    assert sorted(m.id for m in client(ray_url).models.list().data) == sorted([*EXPERTS, "auto"])
    r = httpx.get(ray_url + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["routing"] is True
    m = httpx.get(ray_url + "/metrics", timeout=30)
    assert m.status_code == 200 and "meswitch_http_responses_total" in m.text


def test_mixed_traffic_matches_the_single_process_server_on_both_replicas(ray_url, local_url):
    calls = mixed_traffic()
    with cf.ThreadPoolExecutor(6) as pool:  # concurrent: the replicas batch across experts
        got = list(pool.map(lambda c: ask(ray_url, *c), calls))
    want = [ask(local_url, *c) for c in calls]
    for call, g, w in zip(calls, got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "replica"} == {k: v for k, v in w.items() if k != "replica"}, call
    assert all(g["replica"] for g in got)
    assert len({g["replica"] for g in got}) == 2, "both replicas should serve mixed traffic"
    by_expert: dict[str, set[str]] = {}
    for g in got:
        by_expert.setdefault(g["expert"], set()).add(g["replica"])
    assert set(by_expert) == set(EXPERTS)
    for replica in {g["replica"] for g in got}:  # Ray Serve keeps at most K=2 experts on each replica
        expert = next(e for e, rs in by_expert.items() if replica in rs)
        assert len(_replica_info(replica, expert)["stats"]["experts"]["pinned"]) <= 2


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": "math", "messages": "hi"}, 400, "invalid_type"),
    ({"model": "math", "messages": []}, 400, "invalid_value"),
    ({"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400,
     "max_tokens_too_large"),
    ({"model": "auto", "messages": [{"role": "user", "content": "hi " * 300}], "max_tokens": 100}, 400,
     "context_length_exceeded"),
])
def test_errors_have_the_single_process_shape(ray_url, local_url, body, status, code):
    got = httpx.post(ray_url + "/v1/chat/completions", json=body, timeout=30)
    want = httpx.post(local_url + "/v1/chat/completions", json=body, timeout=30)
    assert (got.status_code, got.json()["error"]["code"]) == (want.status_code, want.json()["error"]["code"])
    assert got.status_code == status and got.json()["error"]["code"] == code
    assert set(got.json()["error"]) == {"message", "type", "param", "code"}


def _replica_info(replica: str, expert: str) -> dict:
    """``info()`` of engine replica ``replica``, asked through Serve.

    Serve sends a call for expert ``e`` to a replica holding ``e`` (the less busy one when both do),
    and a replica may have unloaded ``expert`` since it served it: so every expert is tried in turn.
    """
    engines = serve.get_deployment_handle("MeswitchEngine", app_name="meswitch")
    order = [expert, *(e for e in EXPERTS if e != expert)]
    for attempt in range(150):
        e = order[attempt % len(order)]
        info = engines.options(multiplexed_model_id=e).info.remote().result(timeout_s=30)
        if info["replica"] == replica:
            return info
        time.sleep(0.02)
    raise AssertionError(f"Serve never routed info() to replica {replica}")


def test_a_client_that_leaves_frees_its_slot_on_the_replica(ray_url):
    with httpx.stream("POST", ray_url + "/v1/completions", timeout=30, json={
            "model": "general", "prompt": "Once", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}) as r:
        assert r.status_code == 200
        replica = r.headers["x-meswitch-replica"]
        next(r.iter_lines())  # one event, then hang up
    before = _replica_info(replica, "general")["stats"]["generated_tokens"]  # ~200 tokens take > 1 s here
    deadline = time.monotonic() + 30
    while True:
        info = _replica_info(replica, "general")
        if (info["stats"]["running"] == 0 and info["pending"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert info["stats"]["running"] == 0 and info["pending"] == 0
    assert info["stats"]["generated_tokens"] - before < 150  # cancelled well before its 200 tokens


def _replica_actor(replica_id: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(replica_id)]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def _long_stream(url: str, model: str, first: cf.Future) -> str:
    """A long streamed completion: 'ok', or how it failed. ``first`` gets the replica once a token arrived."""
    try:
        with client(url, timeout=45).completions.with_streaming_response.create(
                model=model, prompt="Once", stream=True, temperature=0, max_tokens=200,
                extra_body={"ignore_eos": True}) as raw:
            finishes = []
            for ch in raw.parse():
                if not first.done():
                    first.set_result(raw.headers["x-meswitch-replica"])
                finishes += [c.finish_reason for c in ch.choices if c.finish_reason]
        return "ok" if finishes == ["length"] else f"error: the stream ended with {finishes}"
    except openai.APITimeoutError:
        return "hang"
    except (openai.APIError, httpx.HTTPError) as e:
        return f"error: {type(e).__name__}"
    finally:
        if not first.done():
            first.set_result(None)


def test_a_killed_replica_is_restarted_and_traffic_goes_on(ray_url):
    with cf.ThreadPoolExecutor(4) as pool:
        firsts = [cf.Future() for _ in range(4)]
        inflight = [pool.submit(_long_stream, ray_url, m, f) for m, f in zip(("math", "code", "general", "math"),
                                                                             firsts, strict=True)]
        victim = next(cf.as_completed(firsts, timeout=60)).result()  # a replica with a stream under way
        assert victim is not None, [f.result() for f in inflight]
        ray.kill(_replica_actor(victim), no_restart=True)
        outcomes = [f.result(timeout=90) for f in inflight]
    assert "hang" not in outcomes
    assert any(o.startswith("error") for o in outcomes), f"the kill should have caught a stream: {outcomes}"
    assert all(o == "ok" or o.startswith("error") for o in outcomes)

    deadline = time.monotonic() + 90
    served: set[str] = set()
    while time.monotonic() < deadline and len(served - {victim}) < 2:
        try:
            served |= {ask(ray_url, "chat", "auto", q)["replica"] for q in QUESTIONS[:3]}
        except openai.APIError:
            time.sleep(1)
    assert len(served - {victim}) == 2, f"Ray should have started a new replica ({served})"
    results = [ask(ray_url, "chat", "auto", q) for q in QUESTIONS]
    assert all(r["finish"] in ("stop", "length") for r in results)
    assert victim not in {r["replica"] for r in results}


class _FakeReplicas:
    """Stands in for the replicas' DeploymentHandle: records what it is sent and answers as an engine would."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict, Request]] = []
        self._options: dict = {}

    def options(self, **kw) -> _FakeReplicas:
        self._options = kw
        return self

    @property
    def generate(self) -> _FakeReplicas:
        return self

    def remote(self, request: Request):
        self.sent.append((self._options, request))

        async def stream():
            yield Accepted(request.request_id, request.expert, "replica-1")
            comp = Completion(request.request_id, "ok", [1], "stop", request.expert, Usage(2, 1), request.route)
            yield StreamEvent(request.request_id, "ok", [1], comp)

        return stream()


def test_remote_engine_sends_the_fronts_expert_and_route_to_the_replicas():
    replicas = _FakeReplicas()
    remote = RemoteEngine(replicas, list(EXPERTS), max_pending=4)
    front = Front(remote.experts, KeywordRouter())

    async def main():
        loop = asyncio.get_running_loop()
        with pytest.raises(UnknownModelError):  # the client serves named experts only: "auto" is the front's
            remote.submit_nowait(Request(prompt="What is 2 plus 2?", expert="auto"), loop)
        request = front.resolve(Request(prompt="What is 2 plus 2?", expert="auto"))
        handle, admitted = remote.submit_nowait(request, loop)
        accepted = await asyncio.wrap_future(admitted)
        events = [ev async for ev in remote.stream(handle)]
        return request, handle, accepted, events

    request, handle, accepted, events = asyncio.run(main())
    assert [(o["multiplexed_model_id"], r.expert, r.route) for o, r in replicas.sent] == [
        ("math", "math", request.route)]
    assert (accepted.expert, accepted.route.domain, handle.replica) == ("math", "math", "replica-1")
    assert events[-1].completion.route == request.route and remote.pending == 0
    assert remote.stats().result(1) is None


def test_cli_flags_build_the_config(saved):
    from meswitch.cli import build_parser

    args = build_parser().parse_args(["serve", str(saved), "--ray", "--replicas", "3", "--experts-per-replica", "2"])
    from meswitch.cli.serve import ray_config

    cfg = ray_config(args)
    assert (cfg.replicas, cfg.experts_per_replica, cfg.store) == (3, 2, str(saved))
    assert cfg.server_config().base_model_id is None  # the base is served only when asked


def test_the_base_model_id_flag_reaches_both_servers_configs(saved):
    from meswitch.cli import build_parser
    from meswitch.cli.serve import ray_config, server_config

    args = build_parser().parse_args(["serve", str(saved), "--base-model-id", "smollm2-135m"])
    assert server_config(args).base_model_id == "smollm2-135m"
    assert ray_config(args).server_config().base_model_id == "smollm2-135m"
    assert RayAppConfig.from_dict({"store": "/s", "base_model_id": "b"}).server_config().base_model_id == "b"


def test_config_from_serve_run_strings():
    cfg = RayAppConfig.from_dict({"store": "/s", "replicas": "2", "experts_per_replica": "none", "router": "false",
                                  "replica_cpus": "0.5", "future_setting": "x"})
    assert (cfg.replicas, cfg.experts_per_replica, cfg.router, cfg.replica_cpus) == (2, None, False, 0.5)
    with pytest.raises(ValueError, match="replicas"):
        RayAppConfig.from_dict({"store": "/s", "replicas": "two"})


def test_example_serve_config_deploys_this_builder():
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / "ray_serve.yaml").read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "meswitch.ray_app:build_app"
    RayAppConfig.from_dict(app["args"])



def test_capacity_arithmetic_for_mistral_7b():
    from meswitch.ray_app.capacity import (
        GIB,
        MISTRAL_7B,
        expert_bytes,
        kv_cache_bytes,
        max_experts_per_replica,
        plan,
    )

    assert MISTRAL_7B.params == 7_241_732_096  # the published parameter count
    assert MISTRAL_7B.linear_params == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert kv_cache_bytes(MISTRAL_7B, 1, 1) == 128 * 1024  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    e = expert_bytes(MISTRAL_7B, 2.0)
    assert e == MISTRAL_7B.linear_params // 4 + 2 * MISTRAL_7B.norm_params
    p = plan(MISTRAL_7B, 1000, 16, 2.0, kv_bytes=0)
    assert (p.k, p.replicas, p.experts_bytes) == (16, 63, 16 * e)
    k = max_experts_per_replica(MISTRAL_7B, 2.0, 80 * GIB, 0)
    assert 2 * MISTRAL_7B.params + k * e <= 80 * GIB < 2 * MISTRAL_7B.params + (k + 1) * e
