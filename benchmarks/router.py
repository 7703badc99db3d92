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
    args = ap.parse_args()
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
