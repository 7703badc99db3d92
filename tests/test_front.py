"""The routing front layer: which text the router reads, name checks, decisions, and routed generation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import pytest

from meswitch.engine import Request, Route, SamplingParams
from meswitch.engine.errors import EngineOverloadedError, UnknownModelError
from meswitch.front import AUTO, Front, RoutedEngine, RoutingUnavailableError, load_store_router, route_text
from tests.engine_helpers import EXPERTS, KeywordRouter, build_tiny, make_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


# ---- the text the router reads ---------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "text"), [
    (Request(prompt="def f(x):"), "def f(x):"),
    (Request(messages=_chat(("user", "first"), ("assistant", "ok"), ("user", "second"))), "second"),
    (Request(messages=_chat(("system", "be brief"), ("user", "the question"), ("assistant", "the answer"))),
     "the question"),
    (Request(messages=_chat(("system", "only a system turn"))), "only a system turn"),
    (Request(messages=_chat(("assistant", "a"), ("system", "last"))), "last"),
    (Request(messages=[]), ""),
    (Request(), ""),
    (Request(messages="not a list"), ""),  # type: ignore[arg-type]
    (Request(messages=["no dict", {"role": "user"}]), ""),  # type: ignore[list-item]
    (Request(messages=[{"role": "user", "content": 5}]), ""),  # type: ignore[dict-item]
])
def test_route_text_is_the_prompt_else_the_last_user_message_else_the_last_message(request_, text):
    assert route_text(request_) == text


# ---- resolving names -------------------------------------------------------------------------------


def test_named_experts_and_the_base_pass_unrouted():
    router = KeywordRouter()
    front = Front(EXPERTS, router)
    assert front.decide(Request(prompt="What is 2 plus 2?", expert="code")) == ("code", None)
    assert front.decide(Request(prompt="What is 2 plus 2?")) == (None, None)
    assert router.seen == []  # the router is asked only for "auto"


def test_an_unknown_name_is_refused_listing_the_experts():
    front = Front(EXPERTS, KeywordRouter())
    with pytest.raises(UnknownModelError) as e:
        front.decide(Request(prompt="hi", expert="gpt-9"))
    assert e.value.name == "gpt-9" and e.value.available == sorted(EXPERTS)
    assert str(e.value) == ("no expert 'gpt-9'; available: 'code', 'general', 'math', 'auto' (routed) "
                            "or None (the base)")


def test_auto_without_a_router_is_refused_before_any_engine():
    front = Front(EXPERTS)
    assert not front.routed and front.models() == list(EXPERTS)
    with pytest.raises(RoutingUnavailableError, match="needs a router"):
        front.decide(Request(prompt="hi", expert=AUTO))


def test_auto_becomes_the_routers_expert_with_its_decision():
    router = KeywordRouter()
    front = Front(EXPERTS, router)
    assert front.routed and front.models() == [*EXPERTS, AUTO]
    name, route = front.decide(Request(messages=_chat(("user", "What is 12 plus 30?")), expert=AUTO))
    assert (name, route) == ("math", Route("math", "math", 0.875, False))
    assert type(route.confidence) is float and type(route.fallback) is bool
    name, route = front.decide(Request(prompt="Tell me about the sea.", expert=AUTO))
    assert (name, route.domain, route.confidence, route.fallback) == ("general", "general", 0.5, True)
    assert [t for t, _ in router.seen] == ["What is 12 plus 30?", "Tell me about the sea."]


def test_resolve_returns_a_copy_naming_the_expert():
    front = Front(EXPERTS, KeywordRouter())
    original = Request(prompt="def add(a, b):", expert=AUTO, params=GREEDY)
    resolved = front.resolve(original)
    assert (resolved.expert, resolved.route.domain) == ("code", "code")
    assert (resolved.request_id, resolved.prompt, resolved.params) == (original.request_id, original.prompt, GREEDY)
    assert (original.expert, original.route) == (AUTO, None)


# ---- routing from an event loop --------------------------------------------------------------------


class _GatedRouter(KeywordRouter):
    """Blocks in ``route`` until ``gate`` opens; counts how many calls run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.inside = 0
        self.most_inside = 0

    def route(self, texts):
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        self.gate.wait(10)
        self.inside -= 1
        return super().route(texts)


def test_async_routing_runs_off_the_loop_one_at_a_time_within_its_queue_limit():
    router = _GatedRouter()
    front = Front(EXPERTS, router, max_queued=3)

    async def main() -> list[Request]:
        loop_thread = threading.current_thread().name
        tasks = [asyncio.create_task(front.resolve_async(Request(prompt=p, expert=AUTO)))
                 for p in ["What is 1 plus 1?", "def f(x):", "hello"]]
        await asyncio.sleep(0.1)  # all three wait for the router; the loop is not blocked
        with pytest.raises(EngineOverloadedError, match="waiting for the router"):
            await front.resolve_async(Request(prompt="one too many", expert=AUTO))
        named = await front.resolve_async(Request(prompt="named", expert="code"))  # no router: never queued
        assert named.expert == "code"
        router.gate.set()
        done = await asyncio.gather(*tasks)
        assert all(thread != loop_thread for _, thread in router.seen)
        return done

    try:
        done = asyncio.run(main())
    finally:
        front.close()
    assert [r.expert for r in done] == ["math", "code", "general"]
    assert router.most_inside == 1
    assert {thread for _, thread in router.seen} == {"meswitch-route_0"}


# ---- routed generation from Python -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("front"))


def test_routed_engine_runs_auto_on_the_chosen_expert_and_reports_the_decision(tiny, smollm_tokenizer):
    routed = RoutedEngine(make_engine(tiny, smollm_tokenizer), KeywordRouter())
    outs = routed.generate([Request(messages=_chat(("user", "def f(x): pass")), expert=AUTO, params=GREEDY),
                            Request(prompt="hello", expert=AUTO, params=GREEDY),
                            Request(prompt="hello", expert="math", params=GREEDY)])
    assert [o.expert for o in outs] == ["code", "general", "math"]
    assert outs[0].route.as_dict() == {"expert": "code", "domain": "code", "confidence": 0.75, "fallback": False}
    assert outs[1].route.fallback and outs[2].route is None
    direct = make_engine(tiny, smollm_tokenizer).generate(
        Request(messages=_chat(("user", "def f(x): pass")), expert="code", params=GREEDY))[0]
    assert outs[0].token_ids == direct.token_ids and direct.route is None
    events = list(routed.stream(Request(prompt="What is 3 plus 4?", expert=AUTO, params=GREEDY)))
    assert events[-1].completion.expert == "math" and events[-1].completion.route.domain == "math"
    with pytest.raises(UnknownModelError):
        routed.generate(Request(prompt="hi", expert="nope"))


def test_routed_engine_without_a_router_refuses_auto(tiny, smollm_tokenizer):
    routed = RoutedEngine(make_engine(tiny, smollm_tokenizer))
    with pytest.raises(RoutingUnavailableError):
        routed.generate(Request(prompt="hi", expert=AUTO, params=GREEDY))
    assert not routed.engine.has_unfinished()


# ---- loading the store's router --------------------------------------------------------------------


def test_load_store_router_asks_meswitch_router_and_is_none_without_it(tiny, monkeypatch):
    _, store = tiny
    assert load_store_router(store) is None  # the tiny store has no router
    sentinel = KeywordRouter()
    monkeypatch.setattr("meswitch.router.load_router", lambda s: sentinel if s is store else None)
    assert load_store_router(store) is sentinel
    monkeypatch.setitem(sys.modules, "meswitch.router", None)  # as if the router extra were not installed
    assert load_store_router(store) is None


# ---- the engine does not route ---------------------------------------------------------------------


def test_importing_the_engine_loads_neither_the_router_nor_compression_nor_the_front():
    code = ("import sys, meswitch.engine, meswitch.engine.background, meswitch.engine.client\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('meswitch.router', 'meswitch.compress', "
            "'meswitch.front')))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
