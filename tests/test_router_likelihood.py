"""The likelihood router (``expert-lik``, ``minilm+lik``) on a tiny store whose experts were trained on their domain.

The base is a tiny random Llama with the SmolLM2 vocabulary; each expert is the base fine-tuned for a
few dozen steps on generated text of its domain (arithmetic, Python, chat), so each expert finds its
own domain's text likelier than the base does, and the router has something real to read.
"""

from __future__ import annotations

import copy
import random
import shutil
from pathlib import Path

import pytest
import torch

from meswitch.data.examples import Example
from meswitch.router import RouterMismatchError, load_router
from meswitch.router.likelihood import ExpertLikelihoodEncoder, query_prefix
from meswitch.router.train import RouterTrainConfig, train_router
from meswitch.store import DeltaStore
from tests.engine_helpers import make_store, tiny_base

WORDS = ["hello", "friend", "how", "are", "you", "today", "weather", "nice", "movie", "dinner", "love", "family",
         "weekend", "happy", "thanks", "music", "book", "walk", "park", "coffee"]


def domain_text(domain: str, rng: random.Random) -> str:
    if domain == "math":
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["+", "-", "*"])
        return f"What is {a} {op} {b}? {a} {op} {b} = {eval(f'{a}{op}{b}')}. Then {b} * 3 = {b * 3}."
    if domain == "code":
        name, arg = rng.choice(["add", "scale", "clip", "norm"]), rng.choice(["x", "y", "values"])
        return f"def {name}({arg}):\n    return [{arg} for {arg} in range({rng.randint(1, 9)}) if {arg}]\n"
    return " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "!"


def examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(domain_text(d, rng), d) for _ in range(n) for d in ("code", "general", "math")]


def finetuned(base, tok, texts: list[str], steps: int = 40, seed: int = 0):
    """``base`` trained on ``texts`` (embeddings frozen, as the zoo trains): next-token loss on every token."""
    model = copy.deepcopy(base).train()
    model.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    rows = [tok(t, add_special_tokens=False)["input_ids"][:24] for t in texts]
    for _ in range(steps):
        batch = [rows[int(i)] for i in torch.randint(len(rows), (16,), generator=g)]
        width = min(len(r) for r in batch)
        ids = torch.tensor([r[:width] for r in batch])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def lik_store(tmp_path_factory, smollm_tokenizer):
    """(store with experts math/code/general, base, tokenizer, store dir); experts stored at 4 bits (rtn)."""
    base = tiny_base()
    train = examples(40, seed=1)
    experts = {d: finetuned(base, smollm_tokenizer, [e.text for e in train if e.domain == d]) for d in
               ("math", "code", "general")}
    root = tmp_path_factory.mktemp("lik")
    store = make_store(root / "store", base, experts, method="rtn", bits=4)
    return store, base, smollm_tokenizer


@pytest.fixture(scope="module")
def lik_router(lik_store):
    store, base, tok = lik_store
    router = train_router(store, examples(12, seed=2), RouterTrainConfig(encoder="expert-lik", max_tokens=24),
                          base=(copy.deepcopy(base), tok))
    router.save(store)
    return router


def test_each_domain_goes_to_the_expert_trained_on_it(lik_store, lik_router):
    test = examples(10, seed=3)
    decisions = lik_router.route([e.text for e in test])
    for d in ("code", "general", "math"):
        hits = [dec.expert == d for e, dec in zip(test, decisions, strict=True) if e.domain == d]
        assert sum(hits) / len(hits) >= 0.9, (d, hits)
    assert all(not dec.warnings for dec in decisions)
    # without the fitted bias the raw ratio already points the right way: the experts' own judgement
    x = lik_router.encoder.encode([e.text for e in test])
    want = torch.tensor([lik_router.config.domains.index(e.domain) for e in test])
    assert (x.argmax(-1) == want).float().mean() >= 0.9


def test_features_are_expert_minus_base_mean_logprob_through_transformers(lik_store):
    """The engine's mixed batch equals each model alone in transformers, on the dequantized expert weights."""
    from meswitch.deltas.apply import apply_delta

    store, base, tok = lik_store
    experts = ["code", "general", "math"]
    enc = ExpertLikelihoodEncoder(store, (copy.deepcopy(base), tok), experts, max_tokens=12, backend="reference")
    texts = ["What is 12 + 30? 12 + 30 = 42.", "def add(x):\n    return x", "hi", "Hello friend, how are you " * 5]
    got = enc.encode(texts, batch_size=3)  # uneven lengths, two engine batches
    # the serving backend (int8 activations in the delta term on a CPU) stays close to the exact one
    fast = ExpertLikelihoodEncoder(store, (copy.deepcopy(base), tok), experts, max_tokens=12).encode(texts)
    assert (fast - got).abs().max() < 2e-2

    def mean_logprob(model, text: str) -> float:
        p = query_prefix(tok, enc.prefix)
        t = tok(text, add_special_tokens=False)["input_ids"][:12]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
        return float(torch.stack([logp[len(p) + k - 1, t[k]] for k in range(len(t))]).mean())

    models = {None: base}
    for name in ("code", "general", "math"):
        layers, entry = store.load_expert(name)
        models[name] = apply_delta(copy.deepcopy(base), layers, entry["layers"])
    for i, text in enumerate(texts):
        ref_base = mean_logprob(models[None], text)
        for c, name in enumerate(("code", "general", "math")):
            assert abs(float(got[i, c]) - (mean_logprob(models[name], text) - ref_base)) < 1e-4


def _broken_copy(store: DeltaStore, dest: Path, expert: str, how: str) -> DeltaStore:
    shutil.copytree(store.path, dest)
    copy_ = DeltaStore.open(dest)
    path = next(p for p in dest.rglob("*.safetensors") if expert in p.name and "router" not in p.parts)
    if how == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return copy_


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_broken_expert_is_skipped_with_a_warning_and_the_request_is_served(lik_store, lik_router, tmp_path, how):
    from meswitch.engine import Engine
    from meswitch.engine.request import Request
    from meswitch.engine.sampling import SamplingParams
    from meswitch.front import RoutedEngine

    store, base, tok = lik_store
    broken = _broken_copy(store, tmp_path / "s", "math", how)
    router = load_router(broken, base=(copy.deepcopy(base), tok))
    texts = [e.text for e in examples(3, seed=4)]
    decisions = router.route(texts, top_k=3)
    for d in decisions:
        assert d.expert != "math" and d.domain != "math"
        assert len(d.warnings) == 1 and "'math'" in d.warnings[0]
        assert "math" not in [n for n, _ in d.top_k] and abs(sum(p for _, p in d.top_k) - 1) < 1e-5
    probs = router.probabilities(texts)
    assert torch.all(probs[:, router.config.domains.index("math")] == 0)

    served = RoutedEngine(Engine(broken, copy.deepcopy(base), tok), router)
    math_query = "What is 12 + 30? 12 + 30 = 42."
    [done] = served.generate(Request(prompt=math_query, expert="auto", params=SamplingParams(max_tokens=2)))
    assert done.finish_reason != "error" and done.expert in ("code", "general")
    assert done.route.warnings and "'math'" in done.route.warnings[0]
    assert done.route.as_dict()["warnings"] == list(done.route.warnings)


def test_the_server_shows_the_routes_warnings():
    from types import SimpleNamespace

    from meswitch.engine.request import Request
    from meswitch.front.routing import Front
    from meswitch.server.choices import route_info

    class Warned:
        def route(self, texts):
            return [SimpleNamespace(expert="code", domain="code", confidence=0.9, fallback=False,
                                    warnings=("expert 'math' could not be scored",))]

    request = Front(["code", "math"], Warned()).resolve(Request(prompt="x", expert="auto"))
    info = route_info(SimpleNamespace(route=request.route, expert="code"))
    assert info.warnings == ["expert 'math' could not be scored"] and info.expert == "code"
    plain = Front(["code"], None).resolve(Request(prompt="x", expert="code"))
    assert route_info(SimpleNamespace(route=plain.route, expert="code")).warnings is None


def test_saved_router_loads_back_and_is_refused_by_another_store(lik_store, lik_router, tmp_path):
    store, base, tok = lik_store
    again = load_router(DeltaStore.open(store.path), base=(copy.deepcopy(base), tok))
    assert again.kind == "expert-lik" and again.config.encoder["options"]["experts"] == ["code", "general", "math"]
    texts = [e.text for e in examples(2, seed=5)]
    assert torch.allclose(again.probabilities(texts), lik_router.probabilities(texts), atol=1e-5)
    assert [d.expert for d in again.route(["", "  "])] == ["general", "general"]
    other = make_store(tmp_path / "other", tiny_base(seed=1), {})
    shutil.copytree(store.path / "router", other.path / "router")
    other.set_extra("router", store.extra["router"])
    with pytest.raises(RouterMismatchError, match="another store|base"):
        load_router(other, base=(copy.deepcopy(base), tok))


def test_minilm_plus_likelihood_is_one_head_over_both(lik_store):
    store, base, tok = lik_store
    router = train_router(store, examples(8, seed=6), RouterTrainConfig(encoder="minilm+lik", max_tokens=16,
                                                                       epochs=10), base=(copy.deepcopy(base), tok))
    feats = router.encoder.encode(["What is 2 + 2?"])
    assert feats.shape == (1, 768 + 3)
    assert torch.allclose(feats[:, 768:], router.encoder.lik.encode(["What is 2 + 2?"]), atol=1e-6)
    router.save(store, activate=False)
    again = load_router(DeltaStore.open(store.path), "minilm+lik", base=(copy.deepcopy(base), tok))
    texts = [e.text for e in examples(2, seed=7)]
    assert torch.allclose(again.probabilities(texts), router.probabilities(texts), atol=1e-4)
