"""Compare the router's three encoders on in-distribution and out-of-source queries.

For each encoder: train on the default mix of a store (a copy is made; the store itself is not
changed), then evaluate on the zoo's held-out test split (in-distribution) and on the out-of-source
sets of ``meswitch.router.data`` (sources no training mix uses), and time routing at batch 1.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/router.py --store ~/.cache/meswitch/stores/full

Writes docs/results/router.{md,json} and router_reliability.png. The base-model encoders are slow
on a CPU: ``--train-per-domain`` / ``--eval-per-set`` subsample for them (each row says how many).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/router.py --loso [--per-source 300]

``--loso`` needs no store: leave-one-source-out over the packaged corpus (``meswitch.router.corpus``)
for the default minilm recipe, the previous default mix (the full zoo's training text plus the broad
styles) scored on every corpus source as the "before" row, the risk-coverage curve and ECE of the
held-out predictions, and batch-1 latency of a router trained on the new default text. Writes
docs/results/router_loso.{md,json} and router_loso.png.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir, rss_bytes  # noqa: E402

# A hand-written probe of short, casual queries (the zoo's math and code text is long and formal).
# 24 queries are too few for a target; they show a failure mode the larger sets do not contain.
SHORT = {
    "math": ["Find the integral of x^2 sin x", "is 7 prime?", "what is 15% of 80", "Solve 2x + 3 = 11",
             "derivative of ln(x)/x", "How many ways can 5 people sit in a row?",
             "What's the area of a circle with radius 3?", "simplify (x^2 - 1)/(x - 1)"],
    "code": ["write me a bash script that renames files", "how do I reverse a list in python",
             "fix this: for i in range(10) print(i)", "SQL query to find duplicate emails",
             "What does `git rebase -i` do?", "write a regex for email addresses",
             "convert this JSON to a TypeScript interface", "why does my React component re-render twice?"],
    "general": ["what's your favourite film? answer in one word", "Write a haiku about autumn",
                "Give me three tips for sleeping better, as bullet points", "Can you recommend a good book?",
                "How do I ask my boss for a raise?", "Tell me a joke about cats",
                "What should I cook for dinner tonight?", "Summarize the plot of Hamlet in two sentences"],
}
SLOW = {"base-probe": (300, 100), "llm-choice": (40, 50)}  # (train per domain, eval per set)


def _subsample(examples: list, per: int | None, seed: int = 0) -> list:
    """At most ``per`` examples of each domain, seeded."""
    if not per:
        return examples
    rng = random.Random(seed)
    by: dict[str, list] = {}
    for e in examples:
        by.setdefault(e.domain, []).append(e)
    return [e for d in sorted(by) for e in (rng.sample(by[d], per) if len(by[d]) > per else by[d])]


def _oos_sets(cache: Path, n: int) -> dict[str, list]:
    from meswitch.data.examples import read_jsonl, write_jsonl
    from meswitch.router.data import out_of_source_sets

    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / f"n{n}.done"
    if not marker.exists():
        for name, ex in out_of_source_sets(n).items():
            write_jsonl(cache / f"{name}.jsonl", ex)
        marker.write_text("ok")
    return {p.stem: read_jsonl(p) for p in sorted(cache.glob("*.jsonl"))}


def run_encoder(kind: str, store, base, test, oos, args) -> dict:
    import torch

    from meswitch.router.eval import evaluate
    from meswitch.router.train import RouterTrainConfig, default_training_examples, train_router

    n_train, n_eval = SLOW.get(kind, (None, None))
    n_train = args.train_per_domain or n_train
    n_eval = args.eval_per_set or n_eval
    train = default_training_examples(store, broad=not args.no_broad)
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    router = train_router(store, train, RouterTrainConfig(encoder=kind, max_per_domain=n_train),
                          base=base if kind != "minilm" else None, progress=True)
    train_s = time.perf_counter() - t0
    extra_rss = rss_bytes() - rss0
    head_bytes = sum(t.numel() * t.element_size() for t in router.head.values())
    enc_params = 0
    if kind == "minilm":
        enc_params = sum(p.numel() * p.element_size() for p in router.encoder.model.state_dict().values()
                         if isinstance(p, torch.Tensor))
    row = {"encoder": kind + (" (zoo text only)" if args.no_broad else ""), "train_examples": router.config.training["examples"], "train_s": train_s,
           "val_accuracy": router.config.training["val_accuracy"], "temperature": router.config.temperature,
           "head_bytes": head_bytes, "encoder_bytes": enc_params, "rss_growth_bytes": extra_rss}
    torch.set_num_threads(args.threads)
    per_set = n_eval and max(1, n_eval // 3)  # the ID split has three domains
    res_id = evaluate(router, _subsample(test, per_set), latency_queries=args.latency_queries)
    row["id"] = res_id
    row["oos"] = {}
    for name, ex in oos.items():
        ex = ex[:n_eval] if n_eval else ex
        row["oos"][name] = evaluate(router, ex, latency_queries=0)
    # the combined out-of-source set: every set pooled, macro over the three domains
    pooled = [e for name in oos for e in (oos[name][:n_eval] if n_eval else oos[name])]
    row["oos_all"] = evaluate(router, pooled, latency_queries=0)
    from meswitch.data.examples import Example

    row["short"] = evaluate(router, [Example(t, d) for d, ts in SHORT.items() for t in ts], latency_queries=0)
    return row


def table(rows: list[dict]) -> str:
    sets = list(rows[0]["oos"])
    head = ["encoder", "ID acc", "OOS acc (macro)", *[f"{s}" for s in sets], "ECE ID", "ECE OOS", "fallback ID",
            "fallback OOS", "short (24)", "p50 ms", "p99 ms", "b64 q/s", "memory", "train n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        mem = (f"{r['encoder_bytes'] / 2**20:.0f} MiB encoder (int8) + {r['head_bytes'] / 2**10:.0f} KiB head"
               if r["encoder"].startswith("minilm") else f"base model (shared) + {r['head_bytes'] / 2**10:.1f} KiB head")
        i, o = r["id"], r["oos_all"]
        lines.append("| " + " | ".join([
            r["encoder"], f"{i['accuracy']:.3f}", f"{o['accuracy']:.3f}",
            *[f"{r['oos'][s]['accuracy']:.3f}" for s in sets],
            f"{i['ece']:.3f}", f"{o['ece']:.3f}", f"{i['fallback_rate']:.3f}", f"{o['fallback_rate']:.3f}", f"{r['short']['accuracy']:.3f}",
            f"{i['latency_ms_p50']:.1f}", f"{i['latency_ms_p99']:.1f}", f"{i['throughput_qps_b64']:.0f}", mem,
            str(r["train_examples"]),
        ]) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4), squeeze=False)
    for ax, r in zip(axes[0], rows, strict=True):
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        for label, res in (("in-distribution", r["id"]), ("out-of-source", r["oos_all"])):
            rel = res["reliability"]
            ax.plot([b["confidence"] for b in rel], [b["accuracy"] for b in rel], "o-", label=f"{label} (ECE {res['ece']:.3f})")
        ax.set(title=r["encoder"], xlabel="confidence", ylabel="accuracy", xlim=(0, 1.02), ylim=(0, 1.02))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def zoo_text(size: str = "full") -> tuple[list, list]:
    """The zoo's (train, test) text, from its cached data directory, else drawn again as the zoo draws it."""
    from meswitch.data.examples import read_jsonl
    from meswitch.data.sources import domain_examples
    from meswitch.paths import cache_root
    from meswitch.zoo.recipe import get_recipe

    data = cache_root() / "zoo" / size / "data"
    if (data / "train.jsonl").is_file() and (data / "test.jsonl").is_file():
        return read_jsonl(data / "train.jsonl"), read_jsonl(data / "test.jsonl")
    recipe = get_recipe(size)
    train, test = [], []
    for i, domain in enumerate(recipe.domains):
        pool = domain_examples(domain, recipe.n_test + recipe.n_train, recipe.seed + 1000 * i)
        test += pool[: recipe.n_test]
        train += pool[recipe.n_test :]
    return train, test


def loso_main(args: argparse.Namespace) -> None:
    """``--loso``: LOSO before/after, risk-coverage, ECE, latency; docs/results/router_loso.*."""
    import torch

    from meswitch.data.examples import Example
    from meswitch.router.corpus import build_corpus
    from meswitch.router.data import broad_training_examples
    from meswitch.router.encoders import build_encoder, clean_text, default_spec
    from meswitch.router.eval import evaluate
    from meswitch.router.loso import (
        HeadRecipe,
        encode_cached,
        fit_head,
        leave_one_source_out,
        score_fixed_head,
    )
    from meswitch.router.train import RouterTrainConfig, train_router

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    corpus = build_corpus(args.per_source, seed=0)
    print(f"corpus: {len(corpus)} texts, {len({e.source for e in corpus})} sources "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    domains = sorted({e.domain for e in corpus})
    encoder = build_encoder(default_spec("minilm"), domains)
    x = encode_cached(encoder, [clean_text(e.text) for e in corpus], progress=True)
    recipe = HeadRecipe()
    after = leave_one_source_out(corpus, x, recipe, progress=True)

    zoo_train, zoo_test = zoo_text("full")
    n_style = max(32, min(400, len(zoo_train) // 12))

    def head_on(mix: list) -> tuple:
        mix = [e for e in mix if clean_text(e.text)]
        xm = encode_cached(encoder, [clean_text(e.text) for e in mix], progress=True)
        return fit_head(xm, torch.tensor([domains.index(e.domain) for e in mix]), len(domains), recipe), len(mix)

    (head, temperature), n_old = head_on(zoo_train + broad_training_examples(zoo_train, n_style, 0, corpus=False))
    before = score_fixed_head(corpus, x, head, temperature, domains, recipe)
    (head_new, t_new), n_new = head_on(zoo_train + broad_training_examples(zoo_train, n_style, 0))
    zoo_test = [Example(clean_text(e.text), e.domain, source=f"zoo-test/{e.domain}") for e in zoo_test]
    xt = encode_cached(encoder, [e.text for e in zoo_test])
    short = [Example(t, d, source=f"short/{d}") for d, ts in SHORT.items() for t in ts]
    xs = encode_cached(encoder, [e.text for e in short])
    ids = {name: score_fixed_head(zoo_test, xt, h, t, domains, recipe)
           for name, (h, t) in (("before", (head, temperature)), ("after", (head_new, t_new)))}
    shorts = {name: score_fixed_head(short, xs, h, t, domains, recipe)
              for name, (h, t) in (("before", (head, temperature)), ("after", (head_new, t_new)))}

    # batch-1 latency of a default minilm router (the head's training data does not change its cost)
    with tempfile.TemporaryDirectory() as tmp:
        store = throwaway_store(Path(tmp) / "s")
        router = train_router(store, corpus[::10], RouterTrainConfig(epochs=5))
        lat = evaluate(router, zoo_test, latency_queries=args.latency_queries)
    out = {"per_source_cap": args.per_source, "corpus_size": len(corpus), "threads": args.threads,
           "after": after, "before": before,
           "id": {k: {"macro": v["macro"], "per_source": v["per_source"], "ece": v["ece"]} for k, v in ids.items()},
           "short": {k: v["macro"] for k, v in shorts.items()},
           "train_examples": {"before": n_old, "after": n_new},
           "latency_ms_p50": lat["latency_ms_p50"], "latency_ms_p99": lat["latency_ms_p99"]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_loso.json").write_text(json.dumps(out, indent=2, default=float))
    md = loso_markdown(out)
    (args.out / "router_loso.md").write_text(md)
    plot_loso(out, args.out / "router_loso.png")
    print(md)


def throwaway_store(path: Path):
    """A store with experts code/general/math and no weights worth the name: routers only map domains to them."""
    import torch

    from meswitch.store import DeltaStore

    store = DeltaStore.create(path, "0" * 64, {"architecture": "LlamaForCausalLM", "model_type": "llama",
                                                "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
                                                "num_parameters": 1})
    for name in ("code", "general", "math"):
        layer = {"model.layers.0.mlp.up_proj": {"q": torch.zeros(4, 2, dtype=torch.uint8)}}
        store.add_expert(name, layer, {"model.layers.0.mlp.up_proj": {"method": "rtn", "bits": 2}}, {"bits": 2})
    return store


def loso_markdown(out: dict) -> str:
    """The before/after LOSO table, the risk-coverage rows and the new default's ID and latency figures."""
    a, b = out["after"], out["before"]
    lines = [f"Leave-one-source-out over the packaged corpus ({out['corpus_size']} texts, up to "
             f"{out['per_source_cap']} per source), {machine()}, {out['threads']} torch thread(s)", "",
             "| held-out source | domain | n | before (previous default mix) | after (LOSO) | ECE after |",
             "|---|---|---|---|---|---|"]
    for s, r in sorted(a["per_source"].items(), key=lambda kv: (kv[1]["domain"], kv[0])):
        lines.append(f"| {s} | {r['domain']} | {r['n']} | {b['per_source'][s]['accuracy']:.3f} | "
                     f"{r['accuracy']:.3f} | {r['ece']:.3f} |")
    lines += [f"| **worst** | | | {b['worst']['accuracy']:.3f} ({b['worst']['source']}) | "
              f"{a['worst']['accuracy']:.3f} ({a['worst']['source']}) | |",
              f"| **macro over sources** | | | {b['macro']:.3f} | {a['macro']:.3f} | |",
              f"| **ECE, all held-out** | | | {b['ece']:.3f} | {a['ece']:.3f} | |", "",
              "Before: one head on the previous default text (the full zoo's training split plus the broad "
              "styles), scored on every corpus source; it trained on some of these sources (word problems, "
              "CodeIO, CPython, chitchat, chatterbot, ShareGPT prose, the templated styles), so its figure "
              "is optimistic there. After: for each source, a head trained on every other source.", "",
              "| coverage % | " + " | ".join(str(int(r["coverage"])) for r in a["risk_coverage"]) + " |",
              "|---|" + "---|" * len(a["risk_coverage"]),
              "| accuracy (LOSO) | " + " | ".join(f"{r['accuracy']:.3f}" for r in a["risk_coverage"]) + " |",
              "| threshold | " + " | ".join(f"{r['threshold']:.3f}" for r in a["risk_coverage"]) + " |",
              "| accuracy (before) | " + " | ".join(f"{r['accuracy']:.3f}" for r in b["risk_coverage"]) + " |", ""]
    lines.append(f"Default recipe, one head on all its text (before: {out['train_examples']['before']} texts, after: "
                 f"{out['train_examples']['after']}): zoo test split (in-distribution, macro over domains) "
                 f"{out['id']['before']['macro']:.3f} -> {out['id']['after']['macro']:.3f}; short probe (24) "
                 f"{out['short']['before']:.3f} -> {out['short']['after']:.3f}. Batch-1 latency of the minilm router: "
                 f"p50 {out['latency_ms_p50']:.1f} ms, p99 {out['latency_ms_p99']:.1f} ms.")
    return "\n".join(lines) + "\n"


def plot_loso(out: dict, path: Path) -> None:
    """Per-source LOSO accuracy (before/after), risk-coverage and reliability of held-out predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from meswitch.router.eval import plot_risk_coverage

    a, b = out["after"], out["before"]
    names = sorted(a["per_source"], key=lambda s: (a["per_source"][s]["domain"], s))
    fig, (p, q, r) = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    pos = range(len(names))
    p.barh([i + 0.2 for i in pos], [b["per_source"][s]["accuracy"] for s in names], 0.4, label="before")
    p.barh([i - 0.2 for i in pos], [a["per_source"][s]["accuracy"] for s in names], 0.4, label="after (LOSO)")
    p.set_yticks(list(pos), [f"{a['per_source'][s]['domain']}: {s}" for s in names], fontsize=7)
    p.axvline(0.9, color="grey", ls="--", lw=1)
    p.set(xlim=(0, 1), xlabel="accuracy on the held-out source", title="per source")
    p.legend(fontsize=8)
    plot_risk_coverage(q, {"after (LOSO)": a["risk_coverage"], "before": b["risk_coverage"]})
    r.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for label, res in (("after (LOSO)", a), ("before", b)):
        rel = res["reliability"]
        r.plot([x["confidence"] for x in rel], [x["accuracy"] for x in rel], "o-", label=f"{label} ECE {res['ece']:.3f}")
    r.set(xlabel="confidence", ylabel="accuracy", title="reliability, held-out sources", xlim=(0.3, 1.01),
          ylim=(0, 1.02))
    r.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Keyed:
    """An encoder whose cache key also names the store (the base-model encoders' specs do not)."""

    def __init__(self, encoder, store_key: str):
        self.encoder, self.store_key = encoder, store_key

    def spec(self) -> dict:
        return {**self.encoder.spec(), "store": self.store_key}

    def encode(self, texts, batch_size: int = 8, progress: bool = False):
        return self.encoder.encode(texts, progress=progress)


def lik_token_logprobs(enc, texts: list[str], key: str):
    """``[N, E + 1, max_tokens]`` per-token log-probabilities (NaN past a text's end), cached under ``key``."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    from meswitch.paths import cache_root

    digest = hashlib.sha256(json.dumps([key, enc.spec(), texts]).encode()).hexdigest()[:16]
    path = cache_root() / "router-features" / f"lik-{digest}.safetensors"
    if path.is_file():
        return load_file(str(path))["lp"]
    per_text, errors = enc.token_logprobs(texts, progress=True)
    if errors:
        raise SystemExit(f"experts could not be scored: {errors}")
    lp = torch.full((len(texts), len(enc.scored) + 1, enc.max_tokens), float("nan"))
    for i, t in enumerate(per_text):
        lp[i, :, : t.shape[1]] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lp": lp}, str(path))
    return lp


def lik_features(lp, enc, domains: list[str], n: int):
    """``[N, C]`` expert-lik features over the first ``n`` tokens, from ``lik_token_logprobs``'s tensor."""
    mean = lp[:, :, :n].nanmean(-1)  # [N, E + 1]
    cols = [enc.scored.index(e) for e in enc.experts]
    return mean[:, cols] - mean[:, -1:]


def ensemble_loso(examples: list, x_a, x_b, recipe, domains: list[str]) -> dict:
    """LOSO of ``softmax(a * log p_minilm + b * log p_lik)``: per held-out source, an MLP head on ``x_a`` and a
    bias on the scores ``x_b`` (each with its temperature) on the other sources, then ``(a, b)`` fitted by
    cross-entropy on a stratified 15% of those sources that neither head trained on."""
    import torch

    from meswitch.router.calibrate import expected_calibration_error, reliability
    from meswitch.router.head import head_logits
    from meswitch.router.loso import HeadRecipe, fit_head, risk_coverage
    from meswitch.router.train import stratified_split

    y = torch.tensor([domains.index(e.domain) for e in examples])
    fallback = domains.index(recipe.fallback_domain)
    per_source, confs, hits = {}, [], []
    for s in sorted({e.source for e in examples}):
        test = torch.tensor([i for i, e in enumerate(examples) if e.source == s])
        rest = torch.tensor([i for i, e in enumerate(examples) if e.source != s])
        fit_i, val_i = (rest[torch.tensor(v)] for v in stratified_split(y[rest].tolist(), 0.15, recipe.seed))
        ha, ta = fit_head(x_a[fit_i], y[fit_i], len(domains), recipe)
        hb, tb = fit_head(x_b[fit_i], y[fit_i], len(domains), HeadRecipe(kind="scores"))

        def logps(idx, ha=ha, ta=ta, hb=hb, tb=tb):
            with torch.no_grad():
                return (torch.log_softmax(head_logits(ha, x_a[idx]) / ta, -1),
                        torch.log_softmax(head_logits(hb, x_b[idx]) / tb, -1))

        la, lb = logps(val_i)
        w = torch.ones(2, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

        def closure(la=la, lb=lb, w=w, opt=opt, val_i=val_i):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(w[0] * la + w[1] * lb, y[val_i])
            loss.backward()
            return loss

        opt.step(closure)
        ta_, tb_ = logps(test)
        probs = torch.softmax(w.detach()[0] * ta_ + w.detach()[1] * tb_, -1)
        conf, pred = probs.max(-1)
        routed = torch.where(conf < recipe.threshold, torch.full_like(pred, fallback), pred)
        hit = pred == y[test]
        per_source[s] = {"domain": examples[int(test[0])].domain, "n": len(test),
                         "accuracy": float((routed == y[test]).float().mean()),
                         "top1_accuracy": float(hit.float().mean()), "ece": expected_calibration_error(conf, hit),
                         "weights": w.detach().tolist()}
        confs += conf.tolist()
        hits += hit.tolist()
    worst = min(per_source, key=lambda k: per_source[k]["accuracy"])
    c, k = torch.tensor(confs), torch.tensor(hits)
    by_domain = {d: [r["accuracy"] for r in per_source.values() if r["domain"] == d] for d in domains}
    return {"per_source": per_source, "worst": {"source": worst, "accuracy": per_source[worst]["accuracy"]},
            "macro": sum(r["accuracy"] for r in per_source.values()) / len(per_source),
            "macro_by_domain": {d: sum(v) / len(v) for d, v in by_domain.items() if v},
            "ece": expected_calibration_error(c, k), "reliability": reliability(c, k),
            "risk_coverage": risk_coverage(confs, hits)}


def batch1_latency(router, texts: list[str]) -> dict:
    """p50/p95 wall time of ``router.route([text])``, one text at a time, after one warm-up call."""
    import statistics

    router.route([texts[0]])
    times = []
    for t in texts:
        t0 = time.perf_counter()
        router.route([t])
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
            "n": len(times)}


def lik_main(args: argparse.Namespace) -> None:
    """``--lik``: every encoder leave-one-source-out on the corpus, with the store's experts; router_lik.*."""
    import torch

    from meswitch.router.corpus import build_corpus
    from meswitch.router.encoders import build_encoder, clean_text, default_spec
    from meswitch.router.likelihood import ExpertLikelihoodEncoder
    from meswitch.router.loso import HeadRecipe, encode_cached, leave_one_source_out, score_fixed_head
    from meswitch.router.router import load_store_base
    from meswitch.router.train import RouterTrainConfig, resolve_domain_map, train_router
    from meswitch.store import DeltaStore

    torch.set_num_threads(args.threads)
    store = DeltaStore.open(args.store)
    key = store.base["fingerprint"][:16] + ":" + ",".join(f"{e}={store.expert_meta(e)['sha256'][:8]}"
                                                          for e in store.experts)
    corpus = [e for e in build_corpus(args.per_source, seed=0) if clean_text(e.text)]
    texts = [clean_text(e.text) for e in corpus]
    domains = sorted({e.domain for e in corpus})
    mapping = resolve_domain_map(domains, store.experts, {})
    print(f"corpus: {len(corpus)} texts, {len({e.source for e in corpus})} sources", file=sys.stderr, flush=True)
    base = load_store_base(store)
    timings: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
        return out

    x = {"minilm": timed("minilm", lambda: encode_cached(build_encoder(default_spec("minilm"), domains), texts,
                                                          progress=True))}
    x["base-probe"] = timed("base-probe", lambda: encode_cached(
        _Keyed(build_encoder(default_spec("base-probe"), domains, base), key), texts, progress=True))
    x["llm-choice"] = timed("llm-choice", lambda: encode_cached(
        _Keyed(build_encoder(default_spec("llm-choice"), domains, base), key), texts, progress=True))
    lik = ExpertLikelihoodEncoder(store, base, [mapping[d] for d in domains], max_tokens=max(args.lik_tokens))
    lp = timed("expert-lik", lambda: lik_token_logprobs(lik, texts, key))
    mlp, scores = HeadRecipe(), HeadRecipe(kind="scores")
    results: dict[str, dict] = {}
    results["minilm"] = leave_one_source_out(corpus, x["minilm"], mlp)
    results["base-probe"] = leave_one_source_out(corpus, x["base-probe"], mlp)
    results["llm-choice"] = leave_one_source_out(corpus, x["llm-choice"], scores)
    for n in args.lik_tokens:
        results[f"expert-lik ({n} tokens)"] = leave_one_source_out(corpus, lik_features(lp, lik, domains, n), scores)
    n_def = args.lik_default_tokens
    xl = lik_features(lp, lik, domains, n_def)
    ident = {"mu": torch.zeros(len(domains)), "sigma": torch.ones(len(domains)), "w": torch.eye(len(domains)),
             "b": torch.zeros(len(domains))}
    results[f"expert-lik ({n_def} tokens, nothing fitted)"] = score_fixed_head(corpus, xl, ident, 1.0, domains, mlp)
    results[f"minilm+lik (one head, {n_def} tokens)"] = leave_one_source_out(corpus, torch.cat([x["minilm"], xl], 1), mlp)
    results[f"ensemble minilm x expert-lik ({n_def} tokens)"] = ensemble_loso(corpus, x["minilm"], xl, mlp, domains)

    # batch-1 latency of each router kind as saved and loaded (heads trained on a slice of the corpus)
    lat_texts = texts[:: max(1, len(texts) // args.latency_queries)][: args.latency_queries]
    latency = {}
    sample = corpus[::7]
    for kind in ("minilm", "base-probe", "llm-choice", "expert-lik", "minilm+lik"):
        cfg = RouterTrainConfig(encoder=kind, epochs=5, max_tokens=n_def if "lik" in kind else None)
        router = train_router(store, sample, cfg, base=base)
        latency[kind] = batch1_latency(router, lat_texts)
        print(f"latency {kind}: {latency[kind]}", file=sys.stderr, flush=True)
        del router
        gc.collect()
    out = {"store": str(args.store), "experts": store.experts, "per_source_cap": args.per_source,
           "corpus_size": len(corpus), "threads": args.threads, "encode_s": timings, "latency": latency,
           "results": {k: {kk: vv for kk, vv in v.items() if kk != "reliability"} for k, v in results.items()},
           "lik_default_tokens": n_def}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_lik.json").write_text(json.dumps(out, indent=2, default=float))
    md = lik_markdown(out)
    (args.out / "router_lik.md").write_text(md)
    print(md)


def lik_markdown(out: dict) -> str:
    res, lat = out["results"], out["latency"]
    names = list(res)
    lat_of = {n: lat.get(n.split(" ")[0]) for n in names}
    lines = [f"Routers leave-one-source-out on the packaged corpus ({out['corpus_size']} texts, up to "
             f"{out['per_source_cap']} per source), experts of `{out['store']}`, {machine()}, "
             f"{out['threads']} torch thread(s)", "",
             "| router | LOSO macro | worst source | code | general | math | ECE | p50 ms | p95 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        r = res[n]
        by = r.get("macro_by_domain") or {}
        if not by:
            doms = {}
            for v in r["per_source"].values():
                doms.setdefault(v["domain"], []).append(v["accuracy"])
            by = {d: sum(v) / len(v) for d, v in doms.items()}
        la = lat_of[n] or {}
        lines.append(f"| {n} | {r['macro']:.3f} | {r['worst']['accuracy']:.3f} ({r['worst']['source']}) | "
                     f"{by.get('code', 0):.3f} | {by.get('general', 0):.3f} | {by.get('math', 0):.3f} | {r['ece']:.3f} | "
                     + (f"{la['p50_ms']:.1f} | {la['p95_ms']:.1f} |" if la else "- | - |"))
    lines += ["", "Latency: `router.route([text])` at batch 1, one router of each kind (minilm+lik for the combined "
              "rows, expert-lik for every expert-lik row at the default token count).", "",
              "| held-out source | domain | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    first = res[names[0]]["per_source"]
    for s, r in sorted(first.items(), key=lambda kv: (kv[1]["domain"], kv[0])):
        lines.append(f"| {s} | {r['domain']} | {r['n']} | " + " | ".join(f"{res[n]['per_source'][s]['accuracy']:.3f}"
                                                                       for n in names) + " |")
    lines.append("")
    lines.append("Encoding the corpus once (s): " + ", ".join(f"{k} {v:.0f}" for k, v in out["encode_s"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/meswitch/stores/full")
    ap.add_argument("--encoders", default="minilm,base-probe,llm-choice")
    ap.add_argument("--threads", type=int, default=2, help="torch threads while timing (default 2)")
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--train-per-domain", type=int, help="override the per-encoder training subsample")
    ap.add_argument("--eval-per-set", type=int, help="override the per-encoder evaluation subsample")
    ap.add_argument("--oos-n", type=int, default=300, help="queries per out-of-source set")
    ap.add_argument("--no-broad", action="store_true", help="train on the zoo's text alone (no broad mix)")
    ap.add_argument("--out", type=Path, default=results_dir())
    ap.add_argument("--loso", action="store_true", help="leave-one-source-out before/after (needs no store)")
    ap.add_argument("--per-source", type=int, default=123,
                    help="--loso: corpus examples per source (default 123: what the default recipe takes for the full zoo)")
    ap.add_argument("--lik", action="store_true", help="the likelihood router against the others (router_lik.*)")
    ap.add_argument("--lik-tokens", type=lambda v: [int(x) for x in v.split(",")], default=[16, 32, 48],
                    help="--lik: expert-lik over the first N tokens, for each N (default 16,32,48)")
    ap.add_argument("--lik-default-tokens", type=int, default=32, help="--lik: N of the combined rows and latency")
    args = ap.parse_args()
    if args.lik:
        lik_main(args)
        return
    if args.loso:
        loso_main(args)
        return

    from meswitch.data.examples import read_jsonl
    from meswitch.router.router import load_store_base
    from meswitch.store import DeltaStore
    from meswitch.zoo.build import ZooPaths

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(args.store, copy, ignore=shutil.ignore_patterns("router", ".lock"))
        store = DeltaStore.open(copy)
        test = read_jsonl(ZooPaths(Path(store.extra["base_path"]).parent).split(None, "test"))
        oos = _oos_sets(Path(tmp).parent / "meswitch-router-oos", args.oos_n)
        kinds = args.encoders.split(",")
        base = load_store_base(store) if any(k != "minilm" for k in kinds) else None
        rows = []
        for kind in kinds:
            print(f"== {kind}", file=sys.stderr, flush=True)
            rows.append(run_encoder(kind, store, base, test, oos, args))
            print(table(rows[-1:]), flush=True)
    md = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router.md").write_text(
        f"Router encoders, {machine()}, {args.threads} torch threads while timing\n\n{md}\n\n"
        "ID: the zoo's held-out test split. OOS: sets no training mix uses (meswitch.router.data), "
        "macro accuracy over math/code/general of all sets pooled.\n")
    (args.out / "router.json").write_text(json.dumps(rows, indent=2, default=float))
    plot(rows, args.out / "router_reliability.png")
    print(md)


if __name__ == "__main__":
    main()
