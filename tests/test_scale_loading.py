"""Many experts on one engine: background loading and prefetch, checksums once per file, broken files."""

from __future__ import annotations

import copy
import os
import threading
import time

import httpx
import pytest

from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.engine.errors import BudgetError
from meswitch.engine.loader import THREAD_NAME
from meswitch.store import DeltaStore, base_info, fingerprint_model
from meswitch.store.errors import CorruptStoreError
from tests.engine_helpers import expert_layers, perturbed, tiny_base
from tests.server_helpers import LiveServer

N = 24  # experts in the store: three distinct deltas, each stored under eight names (eight files)
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
PROMPTS = ["Hello there, how are", "def add(a, b):", "What is 7 times 6?", "The weather today"]


def _name(i: int) -> str:
    return f"e{i:02d}"


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A tiny base and a store of ``N`` 2-bit experts, written in one ``add_experts`` call."""
    base = tiny_base()
    encoded = [expert_layers(base, perturbed(base, s), "salient", bits=2, k=8) for s in (1, 2, 3)]
    root = tmp_path_factory.mktemp("many") / "store"
    store = DeltaStore.create(root, fingerprint_model(base), base_info(base))
    store.add_experts((_name(i), *encoded[i % 3], {"method": "salient"}) for i in range(N))
    return base, root


def _copy(many, tmp_path) -> DeltaStore:
    """A private copy of the store (tests that break files)."""
    import shutil

    shutil.copytree(many[1], tmp_path / "store")
    return DeltaStore.open(tmp_path / "store")


def _engine(base, store, tok, **kw) -> Engine:
    return Engine(store, copy.deepcopy(base), tok, EngineConfig(**kw))


def _one(store) -> int:
    return max(store.total_bytes(n) for n in store.experts)


def _requests(experts) -> list[Request]:
    return [Request(prompt=PROMPTS[i % 4], expert=e, params=GREEDY) for i, e in enumerate(experts)]


def test_add_experts_writes_every_expert_and_the_manifest_once(many):
    store = DeltaStore.open(many[1])
    assert store.experts == [_name(i) for i in range(N)]
    files = {store.expert_meta(n)["sha256"] for n in store.experts}
    assert len(files) == N  # each name its own file
    store.verify()


def test_a_mixed_queue_over_a_small_budget_gives_what_each_request_gives_alone(many, smollm_tokenizer):
    base, root = many
    store = DeltaStore.open(root)
    order = [None if i is None else _name(i) for i in (0, 5, 0, 9, 13, 5, 21, None, 0, 17, 9, 2)]
    alone = _engine(base, store, smollm_tokenizer, prefetch=0)
    want = [alone.generate(r)[0].token_ids for r in _requests(order)]
    eng = _engine(base, store, smollm_tokenizer, max_batch=4, max_resident_bytes=3 * _one(store))
    got = eng.generate(_requests(order))
    assert [c.finish_reason for c in got] == ["length"] * len(order)
    assert [c.token_ids for c in got] == want
    assert eng.pool.resident_bytes() <= 3 * _one(store)
    stats = eng.stats()["experts"]["experts"]
    assert sum(s["background"] for s in stats.values()) > 0


def test_a_queued_requests_expert_is_loaded_on_the_loader_thread_before_admission(many, smollm_tokenizer):
    base, root = many
    eng = _engine(base, DeltaStore.open(root), smollm_tokenizer, max_batch=1)
    threads: dict[str, str] = {}
    stage = eng.pool.stage

    def recording(idx):
        threads[eng.pool.names[idx]] = threading.current_thread().name
        return stage(idx)

    eng.pool._loader._stage = recording  # the loader calls the pool's stage; record where it runs
    first, second = _requests([_name(1), _name(2)])
    eng.add_request(first)
    eng.add_request(second)
    eng.step()  # e01 admitted (the batch holds one); e02 waits and its expert starts loading
    assert eng.num_running == 1 and eng.num_waiting == 1
    deadline = time.monotonic() + 30
    while not eng.pool.is_resident(eng.pool.lookup(_name(2))):
        assert time.monotonic() < deadline, "the queued request's expert was never loaded"
        eng.pool.poll()
        time.sleep(0.01)
    assert eng.num_waiting == 1  # resident before its request was admitted
    while eng.has_unfinished():
        eng.step()
    assert threads == {_name(1): THREAD_NAME, _name(2): THREAD_NAME}
    s = eng.stats()["experts"]["experts"][_name(2)]
    assert (s["loads"], s["background"], s["hits"], s["misses"]) == (1, 1, 1, 0)


def test_without_prefetch_experts_load_on_the_engine_thread(many, smollm_tokenizer):
    base, root = many
    eng = _engine(base, DeltaStore.open(root), smollm_tokenizer, prefetch=0)
    eng.generate(_requests([_name(3), _name(4)]))
    stats = eng.stats()["experts"]["experts"]
    assert stats[_name(3)]["loads"] == 1 and stats[_name(3)]["background"] == 0
    assert not eng.pool._loader.running


def test_each_file_is_hashed_once_however_often_it_is_loaded(many, smollm_tokenizer, monkeypatch):
    import meswitch.store.store as store_module

    base, root = many
    calls: list[str] = []
    verify = store_module.verify_file
    monkeypatch.setattr(store_module, "verify_file", lambda name, e, p: (calls.append(name), verify(name, e, p)))
    store = DeltaStore.open(root)
    eng = _engine(base, store, smollm_tokenizer, max_batch=2, max_resident_bytes=2 * _one(store))
    order = [_name(i) for i in (0, 1, 2, 3)] * 3  # a budget of two: every expert is evicted and loaded again
    eng.generate(_requests(order))
    loads = {n: s["loads"] for n, s in eng.stats()["experts"]["experts"].items() if s["loads"]}
    assert all(n >= 2 for n in loads.values()), loads
    assert sorted(calls) == sorted(loads)  # one hash per file
    store.verify()  # whole-store verification does not hash the verified files again
    assert len(calls) == len(loads) + N - len(loads)


def test_a_file_changed_after_verification_is_verified_again(many, smollm_tokenizer, tmp_path, monkeypatch):
    import meswitch.store.store as store_module

    store = _copy(many, tmp_path)
    calls: list[str] = []
    verify = store_module.verify_file
    monkeypatch.setattr(store_module, "verify_file", lambda name, e, p: (calls.append(name), verify(name, e, p)))
    name = _name(5)
    path = store.path / store.expert_meta(name)["file"]
    store.load_expert(name)
    store.load_expert(name)
    assert calls == [name]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: same size, new mtime
    store.load_expert(name)
    assert calls == [name, name]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes (and a new mtime)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="sha256"):
        store.load_expert(name)
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(CorruptStoreError, match="truncated"):  # the size is checked on every load
        store.load_expert(name)


def _break(store: DeltaStore) -> dict[str, str]:
    """Remove two expert files, truncate one and flip a byte of another; the expected error per expert."""
    broken = {_name(4): "missing", _name(10): "missing", _name(7): "truncated", _name(15): "sha256"}
    for name, how in broken.items():
        path = store.path / store.expert_meta(name)["file"]
        if how == "missing":
            path.unlink()
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:-100])
        else:
            data = bytearray(path.read_bytes())
            data[-50] ^= 0xFF
            path.write_bytes(bytes(data))
    return broken


def test_missing_and_corrupt_files_fail_their_experts_requests_and_the_rest_serve(many, smollm_tokenizer, tmp_path):
    base, _ = many
    store = _copy(many, tmp_path)
    order = [_name(i % N) for i in range(2 * N)]
    alone = _engine(base, store, smollm_tokenizer, prefetch=0)
    want = {e: alone.generate(r)[0].token_ids for e, r in zip(order[:N], _requests(order[:N]), strict=True)}
    eng = _engine(base, store, smollm_tokenizer, max_batch=4, max_resident_bytes=4 * _one(store))
    broken = _break(store)  # after the engine started
    got = eng.generate(_requests(order))
    for e, c in zip(order, got, strict=True):
        if e in broken:
            assert c.finish_reason == "error" and c.token_ids == []
            assert f"expert {e!r} could not be loaded" in c.error and broken[e] in c.error
        else:
            assert c.finish_reason == "length" and c.token_ids == want[e], e
    assert eng.stats()["errors"] == 2 * len(broken)
    assert not eng.has_unfinished()


def test_the_server_answers_a_broken_expert_with_an_error_naming_it(many, smollm_tokenizer, tmp_path):
    from meswitch.server import engine_app

    base, _ = many
    store = _copy(many, tmp_path)
    eng = _engine(base, store, smollm_tokenizer, max_batch=4, max_resident_bytes=4 * _one(store))
    broken = _break(store)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    with LiveServer(engine_app(eng)) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for name in [_name(0), *broken, _name(1)]:
            r = http.post("/v1/chat/completions", json={**body, "model": name})
            if name in broken:
                assert r.status_code == 500
                assert f"expert {name!r} could not be loaded" in r.json()["error"]["message"]
            else:
                assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        with http.stream("POST", "/v1/chat/completions",
                         json={**body, "model": _name(4), "stream": True}) as r:
            text = r.read().decode()
        assert "could not be loaded" in text and "e04" in text


def test_a_budget_smaller_than_one_expert_is_refused_at_start(many, smollm_tokenizer):
    base, root = many
    store = DeltaStore.open(root)
    with pytest.raises(BudgetError, match="smaller than one expert"):
        _engine(base, store, smollm_tokenizer, max_resident_bytes=_one(store) - 1)
