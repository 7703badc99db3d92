"""The router corpus (many sources, tagged), leave-one-source-out evaluation and risk-coverage."""

from __future__ import annotations

import json
import random

import pytest
import torch

from meswitch.cli import main
from meswitch.data.examples import Example, write_jsonl
from meswitch.router import loso
from meswitch.router.corpus import code_text, general_text, math_text
from meswitch.router.corpus import sources as corpus
from meswitch.router.eval import score_decisions
from meswitch.router.loso import HeadRecipe, leave_one_source_out, risk_coverage
from meswitch.router.router import RouteDecision
from meswitch.router.train import RouterTrainConfig, train_router
from tests.test_router import make_store

TINY = ("meswitch/competition", "reasoning_gym/arithmetic", "chatterbot_corpus/coding", "reasoning_gym/codeio",
        "meswitch/knowledge", "chatterbot_corpus/general")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MESWITCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# ---- risk-coverage and scoring, by hand ---------------------------------------------------------------------
def test_risk_coverage_by_hand():
    rows = risk_coverage([0.6, 0.9, 0.7, 0.8], [True, True, False, True], levels=(25, 50, 75, 100))
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, pytest.approx(2 / 3), 0.75]
    assert [r["threshold"] for r in rows] == [0.9, 0.8, 0.7, 0.6]
    assert [r["count"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(ValueError):
        risk_coverage([0.5], [True, False])


def test_scores_report_accuracy_per_source_and_the_risk_coverage_curve():
    class _Stub:
        class config:  # noqa: N801
            domain_map = {"math": "math", "code": "code"}

        experts = ["code", "math"]

    ex = [Example("a", "math", source="s1"), Example("b", "math", source="s2"), Example("c", "code", source="s2")]
    dec = [RouteDecision("math", "math", 0.9, False, [("math", 0.9)]),
           RouteDecision("code", "code", 0.8, False, [("code", 0.8)]),
           RouteDecision("code", "code", 0.7, False, [("code", 0.7)])]
    r = score_decisions(_Stub(), ex, dec)
    assert r["per_source"] == {"s1": {"n": 1, "accuracy": 1.0}, "s2": {"n": 2, "accuracy": 0.5}}
    assert [x["accuracy"] for x in r["risk_coverage"]][-1] == pytest.approx(2 / 3)
    assert r["risk_coverage"][0]["accuracy"] == 1.0


# ---- the corpus -----------------------------------------------------------------------------------------------
def test_every_source_has_a_domain_and_the_cheap_ones_exist():
    assert {s.domain for s in corpus.SOURCES.values()} == {"math", "code", "general"}
    assert set(corpus.QUICK_SOURCES) <= set(corpus.SOURCES)
    for domain in ("math", "code", "general"):
        assert sum(s.domain == domain for s in corpus.SOURCES.values()) >= 6


@pytest.mark.parametrize("name", TINY)
def test_sources_are_deterministic_tagged_and_capped(name):
    a, b, c = (corpus.draw_source(name, 10, seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert 5 <= len(a) <= 10 and len({e.text for e in a}) == len(a)
    assert all(e.source == name and e.domain == corpus.SOURCES[name].domain and e.text.strip() for e in a)


def test_corpus_is_cached_and_has_no_text_twice():
    first = corpus.build_corpus(8, seed=3, sources=TINY)
    assert corpus.corpus_path(8, 3, TINY).is_file()
    assert corpus.build_corpus(8, seed=3, sources=TINY) == first
    assert corpus.build_corpus(8, seed=3, sources=TINY, cache=False) == first
    assert len({e.text for e in first}) == len(first)
    assert {e.source for e in first} == set(TINY)
    train, test = corpus.split_by_source(first, 0.25, seed=0)
    assert {e.source for e in test} == set(TINY) and not {e.text for e in train} & {e.text for e in test}
    with pytest.raises(ValueError, match="unknown"):
        corpus.build_corpus(4, sources=["nowhere"])


def test_template_generators_are_math_and_varied():
    for make in (math_text.competition_problems, math_text.proof_requests, math_text.symbolic_exercises):
        made = make(40, 0)
        assert {e.domain for e in made} == {"math"} and len({e.text for e in made}) >= 30
    assert any("$" in e.text for e in math_text.competition_problems(20, 1))
    assert all(e.text.split()[0] in {"Prove", "Show", "Give", "Can", "Demonstrate", "Show,"}
               for e in math_text.proof_requests(20, 2))
    assert {e.domain for e in general_text.knowledge_questions(20, 0)} == {"general"}


def test_code_windows_skip_comment_blocks_and_prose():
    rng = random.Random(0)
    comments = ["# a comment line about the licence terms"] * 40
    assert code_text.code_window(comments, rng) is None
    code = [f"    total = total + values[{i}]  # step" if i % 3 else f"def step_{i}(values):" for i in range(40)]
    got = code_text.code_window(code, rng)
    assert got is not None and got.count("\n") >= 2 and set(got.splitlines()) <= set(code)


# ---- leave-one-source-out -----------------------------------------------------------------------------------
def _synthetic(mislabel: bool = False) -> tuple[list[Example], torch.Tensor]:
    """Two sources per domain; features at the domain's centre plus noise. With ``mislabel`` one general
    source's features sit at the math centre: a router trained without it must get it wrong."""
    g = torch.Generator().manual_seed(0)
    centres = {"math": torch.tensor([4.0, 0, 0, 0]), "code": torch.tensor([0, 4.0, 0, 0]),
               "general": torch.tensor([0, 0, 4.0, 0])}
    ex, rows = [], []
    for domain in centres:
        for k in range(2):
            source = f"{domain}/{k}"
            at = centres["math"] if mislabel and source == "general/1" else centres[domain]
            for i in range(30):
                ex.append(Example(f"{source} {i}", domain, source=source))
                rows.append(at + torch.randn(4, generator=g) * 0.5 + torch.tensor([0, 0, 0, float(k)]))
    return ex, torch.stack(rows)


def test_loso_holds_each_source_out_and_scores_it_with_its_own_labels(monkeypatch):
    ex, x = _synthetic()
    seen = []
    real_fit = loso.fit_head
    monkeypatch.setattr(loso, "fit_head", lambda xs, ys, c, r: seen.append(len(xs)) or real_fit(xs, ys, c, r))
    res = leave_one_source_out(ex, x, HeadRecipe(epochs=10))
    assert seen == [len(ex) - 30] * 6  # every head trained without the 30 rows of its held-out source
    assert set(res["per_source"]) == {e.source for e in ex}
    assert all(r["n"] == 30 for r in res["per_source"].values())
    assert res["worst"]["accuracy"] >= 0.9 and res["macro"] >= 0.95
    assert len(res["risk_coverage"]) == 10 and res["risk_coverage"][-1]["count"] == len(ex)

    bad, xb = _synthetic(mislabel=True)
    res = leave_one_source_out(bad, xb, HeadRecipe(epochs=10))
    assert res["per_source"]["general/1"]["accuracy"] < 0.2 and res["worst"]["accuracy"] < 0.2
    assert res["per_source"]["code/0"]["accuracy"] > 0.9
    assert res["ece"] > 0.1  # confidently wrong on the held-out source


def test_loso_refuses_one_source_or_a_domain_left_without_text():
    ex, x = _synthetic()
    only = [e for e in ex if e.source in ("math/0", "code/0", "general/0")]
    xs = x[[i for i, e in enumerate(ex) if e.source in ("math/0", "code/0", "general/0")]]
    from meswitch.router import RouterDataError

    with pytest.raises(RouterDataError, match="no training text"):
        leave_one_source_out(only, xs, HeadRecipe(epochs=2))
    with pytest.raises(RouterDataError, match="feature rows"):
        leave_one_source_out(ex[:-1], x, HeadRecipe(epochs=2))


def test_real_loso_on_the_cheap_sources_routes_unseen_sources():
    res = loso.corpus_loso(12, sources=corpus.QUICK_SOURCES, recipe=HeadRecipe(epochs=20))
    assert set(res["per_source"]) == set(corpus.QUICK_SOURCES)
    assert all(6 <= r["n"] <= 12 for r in res["per_source"].values())
    assert res["worst"]["accuracy"] == min(r["accuracy"] for r in res["per_source"].values()) <= res["macro"]
    assert res["macro"] >= 0.6, res["per_source"]  # chance is 0.33


# ---- the CLI --------------------------------------------------------------------------------------------------
def test_cli_eval_prints_per_source_risk_coverage_and_loso(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    data = corpus.build_corpus(12, seed=0, sources=TINY)
    router = train_router(store, data, RouterTrainConfig(epochs=20))
    router.save(store)
    test = tmp_path / "test.jsonl"
    write_jsonl(test, corpus.build_corpus(6, seed=9, sources=TINY))
    assert main(["router", "eval", str(store.path), "--data", str(test), "--latency-queries", "2"]) == 0
    out = capsys.readouterr().out
    assert "accuracy per source" in out and "risk-coverage" in out and "meswitch/knowledge" in out
    assert main(["router", "eval", str(store.path), "--loso", "--loso-quick", "--loso-per-source", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["loso"]["per_source"]) == set(corpus.QUICK_SOURCES)
    assert 0.0 <= res["loso"]["worst"]["accuracy"] <= res["loso"]["macro"] <= 1.0
    assert [r["coverage"] for r in res["loso"]["risk_coverage"]] == list(map(float, range(10, 101, 10)))
    assert main(["router", "eval", str(store.path)]) == 2
    assert "--loso" in capsys.readouterr().err


def test_temperature_is_finite_where_lbfgs_diverges():
    """Logits of a real LOSO fold (9 validation rows, perfectly separated) on which LBFGS ends on NaN."""
    from meswitch.router.calibrate import fit_temperature

    logits = torch.tensor([
        [-4.20300055, -6.48667908, 12.7865944], [-3.75912333, -6.43856859, 12.0475502],
        [6.48161077, -3.12694955, -6.00875854], [5.67860794, -4.73436451, -5.07161713],
        [6.24120283, -4.53657866, -6.20206356], [3.50552917, -7.81730413, 2.38877416],
        [-1.8499465, 7.65659952, -8.40570354], [-1.83361447, 7.66995811, -6.99200583],
        [-5.8688159, 9.42531872, -6.61568356]])
    labels = torch.tensor([2, 2, 0, 0, 0, 0, 1, 1, 1])
    t = fit_temperature(logits, labels)
    assert 0.0499 <= t <= 20.0  # NaN before: LBFGS stepped into overflow
    assert torch.nn.functional.cross_entropy(logits / t, labels) <= torch.nn.functional.cross_entropy(logits, labels)
