"""The router: routing contract, bad input, storage inside a delta store, calibration, CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from meswitch.cli import main
from meswitch.data.examples import Example, write_jsonl
from meswitch.data.sources import domain_examples
from meswitch.router import (
    CorruptRouterError,
    RouteDecision,
    RouterDataError,
    RouterMismatchError,
    UnmappedDomainError,
    load_router,
)
from meswitch.router.calibrate import expected_calibration_error, fit_temperature
from meswitch.router.encoders import MAX_CHARS, clean_text
from meswitch.router.eval import score_decisions
from meswitch.router.head import head_logits, score_head, train_head
from meswitch.router.train import RouterTrainConfig, resolve_domain_map, stratified_split, train_router
from meswitch.store import DeltaStore

FP = "a" * 64
INFO = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "vocab_size": 128, "num_parameters": 1234}
EXPERTS = ("code", "general", "math")

CLEAR = {  # queries whose domain no reader would dispute
    "math": "A baker sells 48 muffins in the morning and half as many in the afternoon. How many muffins does he sell?",
    "code": 'def merge_sorted(a, b):\n    """Merge two sorted lists into one sorted list and return it."""',
    "general": "Hi! How was your weekend? Did you do anything fun with your family?",
}


def make_store(root: Path, fingerprint: str = FP, experts=EXPERTS) -> DeltaStore:
    store = DeltaStore.create(root, fingerprint, INFO)
    for name in experts:
        layers = {"model.layers.0.mlp.up_proj": {"q": torch.zeros(4, 2, dtype=torch.uint8)}}
        store.add_expert(name, layers, {"model.layers.0.mlp.up_proj": {"method": "rtn", "bits": 2}}, {"bits": 2})
    return store


@pytest.fixture(scope="module")
def labelled() -> list[Example]:
    return [e for d in ("math", "code", "general") for e in domain_examples(d, 40, seed=11)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, labelled):
    """A minilm router trained on a small real mix and saved in a fresh store: (store, router)."""
    store = make_store(tmp_path_factory.mktemp("store") / "s")
    router = train_router(store, labelled, RouterTrainConfig(epochs=30))
    router.save(store)
    return store, router


# ---- the routing contract --------------------------------------------------------------------------------
def test_decisions_follow_the_contract(trained):
    _, router = trained
    texts = list(CLEAR.values())
    decisions = router.route(texts, top_k=2)
    assert len(decisions) == len(texts)
    for d in decisions:
        assert isinstance(d, RouteDecision)
        assert d.expert in router.experts and d.domain in router.config.domains
        assert len(d.top_k) == 2 and d.top_k[0] == (d.domain, d.confidence)
        assert d.top_k[0][1] >= d.top_k[1][1] and 0.0 <= d.confidence <= 1.0
        assert d.fallback == (d.confidence < router.config.threshold)
    with pytest.raises(AttributeError):
        decisions[0].expert = "x"  # frozen


def test_routes_unambiguous_queries_to_their_experts(trained):
    _, router = trained
    got = {domain: d.expert for domain, d in zip(CLEAR, router.route(list(CLEAR.values())), strict=True)}
    assert got == {d: d for d in CLEAR}


def test_top_k_is_clamped_and_probabilities_sum_to_one(trained):
    _, router = trained
    d = router.route([CLEAR["math"]], top_k=10)[0]
    assert [name for name, _ in d.top_k] != [] and len(d.top_k) == 3
    assert math.isclose(sum(p for _, p in d.top_k), 1.0, abs_tol=1e-4)


def test_batch_matches_single(trained):
    _, router = trained
    texts = [*CLEAR.values(), "Solve for x: 3x + 5 = 20", "Tell me a story about a dragon."]
    batch = router.route(texts)
    for t, b in zip(texts, batch, strict=True):
        one = router.route([t])[0]
        assert one.domain == b.domain
        assert abs(one.confidence - b.confidence) < 0.02  # int8 activations are scaled per batch


# ---- bad input -----------------------------------------------------------------------------------------
def test_empty_text_goes_to_the_fallback_expert(trained):
    _, router = trained
    assert router.config.fallback == "general"
    for d in router.route(["", "   \n\t "]):
        assert d == RouteDecision(expert="general", domain="general", confidence=0.0, fallback=True, top_k=[])
    mixed = router.route(["", CLEAR["code"]])
    assert mixed[0].fallback and mixed[1].expert == "code"


def test_a_megabyte_of_text_is_truncated_not_fatal(trained):
    _, router = trained
    huge = CLEAR["code"] + "\n" + "x = x + 1\n" * 100_000
    assert len(huge) > 1_000_000
    d = router.route([huge])[0]
    assert d == router.route([huge[:MAX_CHARS]])[0]


def test_invalid_utf8_is_replaced_not_fatal(trained):
    _, router = trained
    raw = b"\xff\xfe\xfa What is 12 times 7? \xc3\x28"
    decoded = raw.decode("utf-8", "surrogateescape")  # how argv delivers undecodable bytes
    for text in (raw, decoded, "\ud800 lone surrogate"):
        assert len(router.route([text])) == 1
    assert clean_text(raw) == "\ufffd\ufffd\ufffd What is 12 times 7? \ufffd("
    assert clean_text(decoded) == "??? What is 12 times 7? ?("
    assert clean_text("a" * 10, max_chars=4) == "aaaa"


def test_a_single_string_is_refused(trained):
    _, router = trained
    with pytest.raises(Exception, match="list of texts"):
        router.route("just one string")  # type: ignore[arg-type]


# ---- training input ------------------------------------------------------------------------------------
def test_labels_that_map_to_no_expert_are_refused(tmp_path, labelled):
    store = make_store(tmp_path / "s")
    poems = [Example(f"Write a poem about the sea, verse {i}", "poetry") for i in range(8)]
    with pytest.raises(UnmappedDomainError, match="poetry"):
        train_router(store, labelled + poems)
    with pytest.raises(UnmappedDomainError, match="nowhere"):
        resolve_domain_map(["poetry"], EXPERTS, {"poetry": "nowhere"})
    assert resolve_domain_map(["math", "poetry"], EXPERTS, {"poetry": "general"}) == {"math": "math", "poetry": "general"}


def test_one_domain_or_too_few_examples_is_refused(tmp_path, labelled):
    store = make_store(tmp_path / "s")
    with pytest.raises(RouterDataError, match="at least 2 domains"):
        train_router(store, [e for e in labelled if e.domain == "math"])
    with pytest.raises(RouterDataError, match="too few"):
        train_router(store, [*labelled, Example("hello", "general")][:41] + [Example("1+1", "math")])


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = [0] * 20 + [1] * 5 + [2] * 4
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert {labels[i] for i in val} == {0, 1, 2} and {labels[i] for i in train} == {0, 1, 2}


# ---- storage -------------------------------------------------------------------------------------------
def test_saved_router_loads_back_with_identical_outputs(trained):
    store, router = trained
    again = load_router(DeltaStore.open(store.path))
    texts = list(CLEAR.values())
    assert torch.allclose(again.probabilities(texts), router.probabilities(texts), atol=1e-6)
    assert again.experts == ["code", "general", "math"]


def test_manifest_names_files_with_their_sha256(trained):
    store, _ = trained
    entry = store.extra["router"]
    assert entry["active"] == "minilm"
    files = entry["routers"]["minilm"]["files"]
    assert {Path(f["path"]).suffix for f in files.values()} == {".json", ".safetensors"}
    for f in files.values():
        data = (store.path / f["path"]).read_bytes()
        assert f["sha256"] == hashlib.sha256(data).hexdigest() and f["bytes"] == len(data)
    config = json.loads((store.path / files["config"]["path"]).read_text())
    assert config["base_fingerprint"] == FP and config["domain_map"] == {d: d for d in EXPERTS}
    assert not any(p.suffix == ".pkl" for p in store.path.rglob("*"))


def test_store_without_router_gives_none(tmp_path):
    assert load_router(make_store(tmp_path / "s")) is None


def test_retraining_replaces_the_files_and_keeps_one_set(tmp_path, labelled):
    store = make_store(tmp_path / "s")
    for seed in (0, 1):
        train_router(store, labelled, RouterTrainConfig(epochs=5, seed=seed)).save(store)
    assert len(list((store.path / "router" / "minilm").iterdir())) == 2
    assert store.experts == list(EXPERTS)  # the store's writer left the expert files alone


def test_tampered_router_file_is_detected(tmp_path, trained):
    store, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    head = copy / store.extra["router"]["routers"]["minilm"]["files"]["head"]["path"]
    data = bytearray(head.read_bytes())
    data[-1] ^= 0xFF
    head.write_bytes(bytes(data))
    with pytest.raises(CorruptRouterError, match="sha256"):
        load_router(DeltaStore.open(copy))


def test_router_of_another_store_is_refused(tmp_path, trained):
    store, _ = trained
    other = make_store(tmp_path / "other", fingerprint="b" * 64)
    shutil.copytree(store.path / "router", other.path / "router")
    other.set_extra("router", store.extra["router"])
    with pytest.raises(RouterMismatchError, match="another store|base"):
        load_router(other)


def test_router_whose_expert_left_the_store_is_refused(tmp_path, trained):
    store, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(store.path, copy)
    DeltaStore.open(copy).remove_expert("code")
    with pytest.raises(RouterMismatchError, match="code"):
        load_router(DeltaStore.open(copy))


# ---- calibration and the head ---------------------------------------------------------------------------
def test_temperature_recovers_the_one_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(20_000, 3, generator=g)
    labels = torch.multinomial(torch.softmax(logits / 2.5, -1), 1, generator=g).squeeze(1)
    assert abs(fit_temperature(logits, labels) - 2.5) < 0.15


def test_ece_by_hand():
    conf = torch.full((10,), 0.8)
    assert expected_calibration_error(conf, torch.arange(10) < 8) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(torch.full((4,), 0.9), torch.tensor([1, 0, 1, 0]).bool()) == pytest.approx(0.4)
    two = torch.tensor([0.95, 0.95, 0.25, 0.25])
    assert expected_calibration_error(two, torch.tensor([1, 1, 1, 1]).bool()) == pytest.approx(0.05 / 2 + 0.75 / 2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_head_separates_separable_data(kind):
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]]) + 100  # offset: standardisation matters
    y = torch.arange(300) % 3
    x = centers[y] + torch.randn(300, 3, generator=g)
    head = train_head(x, y, 3, kind=kind, epochs=20)
    assert (head_logits(head, x).argmax(-1) == y).float().mean() > 0.98


def test_score_head_recovers_the_bias_that_generated_the_labels():
    g = torch.Generator().manual_seed(0)
    scores = 3 * torch.randn(20_000, 3, generator=g)
    bias = torch.tensor([1.5, -1.0, -0.5])
    labels = torch.multinomial(torch.softmax(scores + bias, -1), 1, generator=g).squeeze(1)
    head = score_head(scores, labels, 3, l2=0.0)
    b = head["b"] - head["b"].mean()  # softmax ignores a shift common to every class
    assert torch.allclose(b, bias - bias.mean(), atol=0.1)
    assert torch.equal(head_logits(head, scores[:5]), scores[:5] + head["b"])


def test_linear_head_is_the_affine_map_it_documents():
    head = {"mu": torch.tensor([1.0, 2.0]), "sigma": torch.tensor([2.0, 4.0]),
            "w": torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]), "b": torch.tensor([0.0, 1.0, 2.0])}
    x = torch.tensor([[3.0, 6.0]])  # standardised: [1, 1]
    assert torch.allclose(head_logits(head, x), torch.tensor([[1.5, 3.0, 1.0]]))


# ---- scoring -------------------------------------------------------------------------------------------
class _StubRouter:
    class config:  # noqa: N801
        domain_map = {"math": "math", "code": "code"}

    experts = ["code", "math"]


def _d(expert: str, domain: str, conf: float, fallback: bool = False) -> RouteDecision:
    return RouteDecision(expert, domain, conf, fallback, [(domain, conf)])


def test_scores_count_domains_without_an_expert_as_errors():
    ex = [Example("a", "math"), Example("b", "math"), Example("c", "code"), Example("d", "poetry")]
    dec = [_d("math", "math", 0.9), _d("code", "code", 0.6, True), _d("code", "code", 0.9), _d("math", "math", 0.9)]
    r = score_decisions(_StubRouter(), ex, dec)
    assert r["per_domain"] == {"code": 1.0, "math": 0.5, "poetry": 0.0}
    assert r["accuracy"] == pytest.approx(0.5)
    assert r["fallback_rate"] == 0.25
    assert r["unknown_domains"] == ["poetry"]
    assert r["confusion"]["math"] == {"code": 1, "math": 1}


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_train_route_eval_inspect(tmp_path, labelled, capsys):
    store = make_store(tmp_path / "s")
    data = tmp_path / "train.jsonl"
    write_jsonl(data, labelled)
    assert main(["router", "train", str(store.path), "--data", str(data), "--threshold", "0.4", "--json"]) == 0
    capsys.readouterr()
    assert main(["route", str(store.path), CLEAR["math"], "", "--json", "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["expert"] == "math" and len(out[0]["top_k"]) == 2
    assert out[1] == {"expert": "general", "domain": "general", "confidence": 0.0, "fallback": True, "top_k": []}

    test = tmp_path / "test.jsonl"
    write_jsonl(test, [Example(t, d) for d, t in CLEAR.items()] + [Example("Write a sonnet", "poetry")])
    assert main(["router", "eval", str(store.path), "--data", str(test), "--json", "--latency-queries", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("accuracy", "per_domain", "confusion", "ece", "fallback_rate", "latency_ms_p50", "latency_ms_p99"):
        assert key in res
    assert res["per_domain"]["poetry"] == 0.0 and res["accuracy"] <= 0.75

    assert main(["inspect", str(store.path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["routers"]["minilm"]["active"] and summary["routers"]["minilm"]["threshold"] == 0.4


def test_cli_errors_are_clear(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    assert main(["route", str(store.path), "hello"]) == 2
    assert "no router" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9", "domain": "general"}\n')
    assert main(["router", "train", str(store.path), "--data", str(bad)]) == 2
    assert "UTF-8" in capsys.readouterr().err


# ---- training and evaluation text ----------------------------------------------------------------------
def test_training_styles_share_nothing_with_the_out_of_source_sets():
    from meswitch.router import augment, data

    assert not set(data.TRAIN_MATH_GENERATORS) & set(data.EVAL_MATH_GENERATORS)
    assert not set(augment.TRAIN_CONSTRAINTS) & set(data.EVAL_CONSTRAINTS)
    general = [Example(f"Tell me about topic {i}.", "general", source="x") for i in range(50)]
    made = augment.with_constraints(general, 40, seed=0)
    assert len(made) == 40 and {e.domain for e in made} == {"general"}
    for e in made:
        tail = e.text.removeprefix(next(g.text for g in general if e.text.startswith(g.text))).strip()
        assert tail and all(c not in tail for c in data.EVAL_CONSTRAINTS)
        assert any(tail.startswith(c) for c in augment.TRAIN_CONSTRAINTS)


def test_templated_styles_are_deterministic_and_labelled():
    from meswitch.router import augment

    for make, domain in ((lambda s: augment.analytic_math_questions(30, s), "math"),
                         (lambda s: augment.prose_code_requests(["sort a list"], ["x = 1"], 30, s), "code"),
                         (lambda s: augment.prose_general_requests(30, s), "general")):
        a, b, c = make(0), make(0), make(1)
        assert a == b and a != c and {e.domain for e in a} == {domain} and all(e.text.strip() for e in a)


@pytest.mark.parametrize(("text", "is_code"), [
    ("How do I implement a hexagonal architecture in c++", True), ("Write it in C#, please", True),
    ("Explain golang channels", True), ("Tell me about the island of Java", True),
    ("What is a javanese dish?", False), ("Plan a trip to Rome", False),
])
def test_the_out_of_source_language_filter_sees_cpp_and_csharp(text, is_code):
    from meswitch.router.data import _CODE_LANG

    assert bool(_CODE_LANG.search(text)) is is_code
