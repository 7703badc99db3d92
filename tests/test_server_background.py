"""BackgroundEngine: the engine on its own thread, fed from many threads and from an event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from meswitch.engine import Request, SamplingParams
from meswitch.engine.background import BackgroundEngine
from meswitch.engine.errors import EngineOverloadedError, EngineStoppedError, UnknownModelError
from meswitch.front import Front
from tests.engine_helpers import KeywordRouter, build_tiny, make_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
PROMPTS = ["Hello there, how are", "def add(a, b):", "What is 7 times 6?", "The weather today"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("background"))


def _requests(n: int) -> list[Request]:
    return [Request(prompt=PROMPTS[i % 4], expert=["math", "code", "general"][i % 3], params=GREEDY) for i in range(n)]


def _thread_checked(engine) -> list[str]:
    """Record which thread calls each engine method (the engine is not thread-safe)."""
    seen: list[str] = []
    for name in ("add_request", "step", "abort"):
        method = getattr(engine, name)

        def wrapped(*a, _m=method, **kw):
            seen.append(threading.current_thread().name)
            return _m(*a, **kw)

        setattr(engine, name, wrapped)
    return seen


def test_many_threads_get_what_the_engine_gives_alone(tiny, smollm_tokenizer):
    want = [c.text for c in make_engine(tiny, smollm_tokenizer).generate(_requests(8))]
    engine = make_engine(tiny, smollm_tokenizer, max_batch=3)
    callers = _thread_checked(engine)
    got: dict[int, str] = {}
    with BackgroundEngine(engine) as bg:
        def run(i: int) -> None:
            events = list(bg.submit(_requests(8)[i]))
            assert events[-1].finished and all(not e.finished for e in events[:-1])
            got[i] = "".join(e.text for e in events)
            assert got[i] == events[-1].completion.text

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert bg.pending == 0
    assert [got[i] for i in range(8)] == want
    assert set(callers) == {"meswitch-engine"}


def test_async_handles_carry_the_route_the_front_chose(tiny, smollm_tokenizer):
    engine = make_engine(tiny, smollm_tokenizer)
    front = Front(engine.experts, KeywordRouter())

    async def main(bg: BackgroundEngine) -> list:
        handles = await asyncio.gather(*(bg.submit_async(front.resolve(Request(prompt=p, expert="auto", params=GREEDY)))
                                         for p in ["What is 2 plus 2?", "def f(x): pass"]))
        assert [(h.expert, h.route.domain) for h in handles] == [("math", "math"), ("code", "code")]
        return [await h.result() for h in handles]

    with BackgroundEngine(engine) as bg:
        done = asyncio.run(main(bg))
    assert [c.expert for c in done] == ["math", "code"]
    assert [c.route.confidence for c in done] == [0.875, 0.75]


def test_validation_errors_reach_the_submitter(tiny, smollm_tokenizer):
    with BackgroundEngine(make_engine(tiny, smollm_tokenizer)) as bg:
        with pytest.raises(UnknownModelError):
            bg.submit(Request(prompt="hi", expert="nope", params=GREEDY))
        assert bg.pending == 0
        assert list(bg.submit(Request(prompt="hi", expert="math", params=GREEDY)))[-1].completion.usage.completion_tokens == 6


def test_pending_limit_and_cancel(tiny, smollm_tokenizer):
    engine = make_engine(tiny, smollm_tokenizer)
    with BackgroundEngine(engine, max_pending=2) as bg:
        gate = threading.Event()
        blocked = bg.call(lambda e: gate.wait(30))
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        handles = [bg.submit_nowait(Request(prompt="hi", expert="math", params=long))[0] for _ in range(2)]
        with pytest.raises(EngineOverloadedError):
            bg.submit_nowait(Request(prompt="hi", expert="math", params=long))
        for h in handles:
            h.cancel()
        gate.set()
        blocked.result(10)
        done = [list(h)[-1].completion for h in handles]
        assert [c.finish_reason for c in done] == ["cancelled", "cancelled"]
        assert bg.call(lambda e: (e.num_running, e.num_waiting)).result(10) == (0, 0)
        assert bg.pending == 0


def test_shutdown_cancels_what_is_in_flight_and_refuses_more(tiny, smollm_tokenizer):
    bg = BackgroundEngine(make_engine(tiny, smollm_tokenizer)).start()
    h = bg.submit(Request(prompt="hi", expert="code", params=SamplingParams(max_tokens=200, ignore_eos=True)))
    bg.shutdown()
    assert not bg.alive
    assert list(h)[-1].completion.finish_reason == "cancelled"
    with pytest.raises(EngineStoppedError):
        bg.submit(Request(prompt="hi", expert="code", params=GREEDY))


@pytest.mark.parametrize("client_path", ["meswitch.engine.background.BackgroundEngine",
                                         "meswitch.ray_app.remote.RemoteEngine"])
def test_each_engine_client_has_every_member_of_the_protocol(client_path):
    import importlib
    import inspect

    from meswitch.engine.client import EngineClient

    module, name = client_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    members = [m for m in vars(EngineClient) if not m.startswith("_")]
    assert {"submit_nowait", "stream", "abort", "experts", "stats", "alive", "pending"} <= set(members)
    for member in members:
        want, got = inspect.getattr_static(EngineClient, member), inspect.getattr_static(cls, member, None)
        assert got is not None, f"{name} lacks {member}"
        if isinstance(want, property):
            assert isinstance(got, property), f"{name}.{member} should be a property"
            continue
        params = list(inspect.signature(want).parameters)
        assert list(inspect.signature(got).parameters)[: len(params)] == params, f"{name}.{member} signature"
