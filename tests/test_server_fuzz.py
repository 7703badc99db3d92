"""Fuzz the server's OpenAPI schema with schemathesis: valid and invalid requests, never a 500, never down.

``MESWITCH_FUZZ_EXAMPLES`` sets the examples per operation and mode (default 25, a few seconds).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from meswitch.engine.background import BackgroundEngine
from meswitch.front import Front
from meswitch.server import ServerConfig, create_app
from tests.engine_helpers import KeywordRouter, build_tiny, make_engine
from tests.server_helpers import KEY, LiveServer

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

EXAMPLES = int(os.environ.get("MESWITCH_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm_tokenizer):
    engine = make_engine(build_tiny(tmp_path_factory.mktemp("fuzz")), smollm_tokenizer, max_batch=4)
    config = ServerConfig(api_key=KEY, max_tokens=8, max_pending=16, max_body_bytes=64 * 1024, body_timeout_s=5)
    front = Front(engine.experts, KeywordRouter(), max_queued=16)
    with BackgroundEngine(engine, max_pending=16) as bg, LiveServer(create_app(bg, front, config)) as server:
        yield server, bg
    front.close()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_never_get_a_500(served, mode):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    server, bg = served
    spec = httpx.get(server.url + "/openapi.json").json()
    # Steer valid cases to served models and allowed lengths so that many reach the engine.
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = spec["components"]["schemas"][name]["properties"]
        props["model"]["enum"] = ["math", "code", "general", "auto", "gpt-4o"]
        props["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 8}, {"type": "null"}]}
    schema = schemathesis.openapi.from_dict(spec)
    statuses: Counter[int] = Counter()
    codes: Counter[str] = Counter()
    auth = {"authorization": f"Bearer {KEY}"}
    for result in schema.get_all_operations():
        op = result.ok()
        if mode == "negative" and op.method.upper() != "POST":
            continue  # nothing to break in a GET without parameters

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        def check(case) -> None:
            resp = case.call(base_url=server.url, headers=auth, timeout=30)
            statuses[resp.status_code] += 1
            if resp.status_code >= 400:
                codes[resp.json()["error"]["code"]] += 1
            assert resp.status_code < 500, (case.method, case.path, case.body, resp.status_code, resp.text[:300])
            if resp.status_code >= 400:
                err = resp.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]

        check()
    print(f"\nfuzz {mode}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}, "
          f"error codes {dict(codes.most_common())}")
    assert sum(statuses.values()) >= EXAMPLES
    if mode == "positive":
        assert statuses[200] > 3  # generation requests got through, not only the three GET endpoints
    assert httpx.get(server.url + "/health").status_code == 200
    assert bg.call(lambda e: e.num_running).result(30) == 0 or bg.alive
