"""``meswitch router train``, ``meswitch router eval`` and ``meswitch route``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from meswitch.errors import MeswitchError

if TYPE_CHECKING:
    from meswitch.router import Router

ENCODERS = ("minilm", "base-probe", "llm-choice", "expert-lik", "minilm+lik")  # meswitch.router.encoders.ENCODERS


def _map_arg(value: str) -> tuple[str, str]:
    domain, sep, expert = value.partition("=")
    if not sep or not domain or not expert:
        raise argparse.ArgumentTypeError(f"expected DOMAIN=EXPERT, got {value!r}")
    return domain, expert


def _prob_arg(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value!r}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="train and evaluate the domain router of a store")
    rsub = r.add_subparsers(dest="router_command", required=True, metavar="WHAT")

    p = rsub.add_parser("train", help="train a router on labelled text and save it inside the store")
    p.add_argument("store", type=Path)
    p.add_argument("--data", type=Path, action="append", default=[], metavar="FILE.jsonl",
                   help="labelled lines {'text', 'domain'} (repeatable; default: the zoo's training text)")
    p.add_argument("--zoo", type=Path, help="zoo directory for the default text (default: the store's base's zoo)")
    p.add_argument("--no-broad", action="store_true",
                   help="with the default text: the zoo's text alone (no corpus, no extra styles)")
    p.add_argument("--no-corpus", action="store_true",
                   help="with the default text: the previous broad styles instead of the multi-source corpus")
    p.add_argument("--encoder", choices=ENCODERS, default="minilm")
    p.add_argument("--head", choices=["mlp", "linear"], default="mlp")
    p.add_argument("--map", type=_map_arg, action="append", default=[], metavar="DOMAIN=EXPERT",
                   help="route DOMAIN to EXPERT (default: the expert named like the domain)")
    p.add_argument("--fallback", help="expert for low-confidence and empty queries (default: general's expert)")
    p.add_argument("--threshold", type=_prob_arg, default=0.5,
                   help="below this calibrated confidence the fallback expert is used (default 0.5)")
    p.add_argument("--max-per-domain", type=int, help="subsample each domain (useful for the slow encoders)")
    p.add_argument("--layer", type=int, help="base-probe: block whose states are pooled (default 2/3 of the depth)")
    p.add_argument("--base", type=Path, help="base checkpoint for the base-model encoders (default: the store's)")
    p.add_argument("--no-activate", action="store_true", help="save it, but keep the store's current router active")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = rsub.add_parser("eval", help="accuracy, confusion, calibration, fallback rate and latency on labelled text")
    p.add_argument("store", type=Path)
    p.add_argument("--data", type=Path, action="append", default=[], metavar="FILE.jsonl",
                   help="labelled lines {'text', 'domain'[, 'source']} (repeatable; needed unless --loso)")
    p.add_argument("--loso", action="store_true",
                   help="also: leave-one-source-out over the packaged corpus with this router's encoder and "
                        "head recipe (train without each source, test on it): the out-of-distribution figure")
    p.add_argument("--loso-per-source", type=int, default=123, metavar="N",
                   help="corpus examples per source for --loso (default 123, what the default recipe takes for the "
                        "full zoo; corpus and features are cached after the first run)")
    p.add_argument("--loso-quick", action="store_true", help="--loso on the 9 cheap sources only (a smoke test)")
    p.add_argument("--encoder", choices=ENCODERS, help="which stored router (default: the active one)")
    p.add_argument("--limit", type=int, help="evaluate the first N lines only")
    p.add_argument("--latency-queries", type=int, default=200, help="queries timed one at a time (default 200)")
    p.add_argument("--base", type=Path, help="base checkpoint for the base-model encoders (default: the store's)")
    p.add_argument("--plot", type=Path, help="write a reliability + confusion PNG")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("route", help="which expert the store's router picks for a text")
    p.add_argument("store", type=Path)
    p.add_argument("text", nargs="+", help="query text; '-' reads one query from standard input")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--encoder", choices=ENCODERS, help="which stored router (default: the active one)")
    p.add_argument("--base", type=Path, help="base checkpoint for the base-model encoders (default: the store's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_route)


def _load(store_path: Path, kind: str | None, base_dir: Path | None):
    from meswitch.router.router import load_router, load_store_base, read_router_config
    from meswitch.store import DeltaStore

    store = DeltaStore.open(store_path)
    found = read_router_config(store, kind)
    if found is None:
        raise MeswitchError(f"{store_path}: the store has no router; train one with: meswitch router train {store_path}")
    base = load_store_base(store, base_dir) if base_dir and found[0].encoder["kind"] != "minilm" else None
    return load_router(store, kind, base=base)


def _read_examples(paths: list[Path]):
    from meswitch.data.examples import read_jsonl

    return [e for p in paths for e in read_jsonl(p)]


def cmd_train(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json
    from meswitch.router.router import load_store_base
    from meswitch.router.train import RouterTrainConfig, default_training_examples, train_router
    from meswitch.store import DeltaStore

    store = DeltaStore.open(args.store)
    examples = _read_examples(args.data) if args.data else default_training_examples(
        store, zoo=args.zoo, broad=not args.no_broad, corpus=not args.no_corpus)
    cfg = RouterTrainConfig(encoder=args.encoder, head=args.head, threshold=args.threshold, fallback=args.fallback,
                            max_per_domain=args.max_per_domain, layer=args.layer)
    base = load_store_base(store, args.base) if args.base and args.encoder != "minilm" else None
    router = train_router(store, examples, cfg, domain_map=dict(args.map), base=base, progress=True)
    entry = router.save(store, activate=not args.no_activate)
    if args.json:
        print_json({"store": str(args.store), "entry": entry, "config": router.config.to_dict()})
        return 0
    print_trained(router, args.store)
    return 0


def print_trained(router: Router, store: Path) -> None:
    """The table of a router just trained and saved in ``store``: domains, experts, examples, validation."""
    from meswitch.cli.render import print_table

    t = router.config.training
    print_table(f"router ({router.kind}) saved in {store}", ["domain", "expert", "train examples"],
                [[d, router.config.domain_map[d], t["per_domain"][d]] for d in router.config.domains])
    print(f"validation: accuracy {t['val_accuracy']:.4f}, ECE {t['val_ece']:.4f} "
          f"(before temperature scaling {t['val_ece_uncalibrated']:.4f}), T = {router.config.temperature:.3f}; "
          f"fallback {router.config.fallback!r} below confidence {router.config.threshold}")


def cmd_eval(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json
    from meswitch.router.eval import evaluate, plot_eval

    if not args.data and not args.loso:
        raise MeswitchError("router eval needs --data FILE.jsonl, --loso, or both")
    router = _load(args.store, args.encoder, args.base)
    out: dict = {}
    if args.data:
        examples = _read_examples(args.data)[: args.limit]
        result = evaluate(router, examples, latency_queries=args.latency_queries)
        if args.plot:
            plot_eval(result, str(args.plot))
        out = {k: v for k, v in result.items() if k != "reliability"}
        if not args.json:
            print_eval(router, result, len(examples))
    if args.loso:
        loso = run_loso(router, args.loso_per_source, quick=args.loso_quick)
        out["loso"] = {k: v for k, v in loso.items() if k != "reliability"}
        if not args.json:
            print_loso(loso)
    if args.json:
        print_json(out)
    return 0


def run_loso(router: Router, per_source: int, quick: bool = False) -> dict:
    """LOSO over the packaged corpus with ``router``'s encoder spec, head recipe and threshold."""
    from meswitch.router.corpus import QUICK_SOURCES
    from meswitch.router.loso import HeadRecipe, corpus_loso

    cfg = router.config.training.get("config") or {}
    home = [d for d in router.config.domains if router.config.domain_map[d] == router.config.fallback]
    recipe = HeadRecipe(kind=router.config.head if router.config.head in ("mlp", "linear") else "mlp",
                        hidden=int(cfg.get("hidden", 128)), epochs=int(cfg.get("epochs", 40)),
                        threshold=router.config.threshold, fallback_domain=home[0] if home else "general",
                        seed=int(cfg.get("seed", 0)))
    return corpus_loso(per_source, sources=QUICK_SOURCES if quick else None, encoder_spec=router.config.encoder,
                       recipe=recipe, progress=False)


def print_eval(router: Router, result: dict, n: int) -> None:
    """Accuracy per domain and per source, calibration, risk-coverage and latency of ``evaluate``."""
    from meswitch.cli.render import print_table

    experts = list(next(iter(result["confusion"].values())))
    print_table(f"router ({router.kind}) on {n} queries: rows = true domain, columns = expert",
                ["domain", "accuracy", *experts],
                [[d, result["per_domain"][d], *result["confusion"][d].values()] for d in result["per_domain"]])
    if len(result["per_source"]) > 1 or "" not in result["per_source"]:
        print_table("accuracy per source", ["source", "queries", "accuracy"],
                    [[s or "(none)", r["n"], r["accuracy"]] for s, r in result["per_source"].items()])
    print(f"macro accuracy {result['accuracy']:.4f} (top-1 domain {result['top1_accuracy']:.4f}), "
          f"ECE {result['ece']:.4f}, fallback rate {result['fallback_rate']:.4f}")
    print_risk_coverage(result["risk_coverage"])
    if "latency_ms_p50" in result:
        print(f"latency at batch 1: p50 {result['latency_ms_p50']:.1f} ms, p99 {result['latency_ms_p99']:.1f} ms; "
              f"throughput at batch 64: {result['throughput_qps_b64']:.0f} queries/s")
    if result["unknown_domains"]:
        print(f"domains with no expert (counted as errors): {', '.join(result['unknown_domains'])}")


def print_risk_coverage(rows: list[dict]) -> None:
    """One line per coverage level: keep the most confident c%, their accuracy, the threshold that does it."""
    from meswitch.cli.render import print_table

    print_table("risk-coverage: the most confident c% of queries (threshold = lowest confidence kept)",
                ["coverage %", "threshold", "accuracy"],
                [[int(r["coverage"]), round(r["threshold"], 4), r["accuracy"]] for r in rows])


def print_loso(loso: dict) -> None:
    """The leave-one-source-out table, its worst source and macro, calibration and risk-coverage."""
    from meswitch.cli.render import print_table
    from meswitch.router.loso import loso_table

    print_table(f"leave-one-source-out: {len(loso['per_source'])} sources, up to {loso['per_source_cap']} each "
                "(trained without the source, tested on it)",
                ["held-out source", "domain", "n", "accuracy", "top-1", "ECE"], loso_table(loso))
    print(f"LOSO worst source {loso['worst']['source']} {loso['worst']['accuracy']:.4f}, macro over sources "
          f"{loso['macro']:.4f} ({', '.join(f'{d} {v:.4f}' for d, v in loso['macro_by_domain'].items())}), "
          f"ECE on held-out sources {loso['ece']:.4f}")
    print_risk_coverage(loso["risk_coverage"])


def cmd_route(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json, print_table

    texts = [sys.stdin.buffer.read().decode("utf-8", "replace") if t == "-" else t for t in args.text]
    router = _load(args.store, args.encoder, args.base)
    decisions = router.route(texts, top_k=args.top_k)
    if args.json:
        print_json([{"expert": d.expert, "domain": d.domain, "confidence": d.confidence, "fallback": d.fallback,
                     "top_k": d.top_k, **({"warnings": list(d.warnings)} if d.warnings else {})} for d in decisions])
        return 0
    rows = [[t[:60].replace("\n", " "), d.expert, d.domain or "-", d.confidence, "yes" if d.fallback else "no",
             ", ".join(f"{n} {p:.3f}" for n, p in d.top_k)] for t, d in zip(texts, decisions, strict=True)]
    print_table(f"routes ({router.kind})", ["text", "expert", "domain", "confidence", "fallback", "top-k"], rows)
    for w in dict.fromkeys(w for d in decisions for w in d.warnings):
        print(f"warning: {w}", file=sys.stderr)
    return 0
