"""Task scores (meswitch's lm-eval suites) of the base, each expert and ``auto`` on one or more stores.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tasks.py --store ~/.cache/meswitch/stores/full [--store S2 ...]
        [--models base,math,code,general,auto] [--tasks meswitch_mc_math,...] [--limit 50]

Every model of a store runs on one engine (``meswitch.harness``, every request of a task handed to
the engine at once). ``auto`` routes each request with the store's router (skipped, and said so, when
the store has none). Writes docs/results/tasks.{json,md}, puts the table into docs/RESULTS.md between
``<!-- tasks:begin -->`` and ``<!-- tasks:end -->`` (appended when absent) and, with several stores
(say, one per bit setting), docs/results/tasks_bits.png: each task's mean expert score against bits per parameter.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tasks.py --by-domain --store ~/.cache/meswitch/stores/full \
        --sweep --hf [--zoo full] [--limit 50]

``--by-domain`` is issue 19's table: each expert scored on its own domain's tasks
(``harness.run.DOMAIN_TASKS``) in every store, the base and ``auto`` on all of them in the first
store (the default recipe), and with ``--hf`` each expert's uncompressed checkpoint through lm-eval's
own Hugging Face model. ``--sweep`` adds the zoo compressed again next to the first store (built once,
reused while its recipe holds): GPTQ at 1, 2 and 3 bits and BitDelta (one sign bit and one scale per
matrix, its scales distilled as in its paper). Below the table: each task's default score against the
uncompressed expert (the target: within one standard error or one point, whichever is larger) and what
``auto`` loses against naming the right expert, in points summed over the domains. The plot
(docs/results/tasks_bits.png) shows one panel per task: score against the expert's bits per parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- tasks:begin -->", "<!-- tasks:end -->"
REUSE = True  # --by-domain keeps each model's scores in the cache and reuses them (--fresh: measure again)


def store_bits(store: Path) -> tuple[float | None, dict[str, Any]]:
    """Mean bits per parameter over the store's experts, and ``inspect``'s summary."""
    from meswitch.store.summary import summarize

    summary = summarize(store)
    bits = [e["bits_per_param"] for e in summary["experts"].values() if e.get("bits_per_param") is not None]
    return (sum(bits) / len(bits) if bits else None), summary


def evaluate_store(store: Path, models: list[str] | None, tasks: list[str] | None, limit: int | None,
                   chat: bool) -> dict[str, Any]:
    """``{store, bits_per_param, models: {name: {task: row}}, skipped, seconds}`` for one store."""
    from meswitch.engine import Engine
    from meswitch.front import load_store_router
    from meswitch.harness import register
    from meswitch.harness.run import evaluate_tasks, primary_scores

    lm_cls = register()
    bits, _ = store_bits(store)
    engine = Engine.from_store(store)
    router = load_store_router(engine.store)
    names = models or ["base", *engine.experts, "auto"]
    out: dict[str, Any] = {"store": str(store), "bits_per_param": bits, "models": {}, "skipped": {}, "seconds": {}}
    for name in names:
        if name == "auto" and router is None:
            out["skipped"][name] = "the store has no router (meswitch router train STORE)"
            print(f"[{store.name}] auto: skipped, {out['skipped'][name]}", flush=True)
            continue
        t0 = time.perf_counter()
        lm = lm_cls(engine=engine, expert=name, router=router)
        res = evaluate_tasks(lm, tasks, limit=limit, chat_template=chat)
        out["models"][name] = primary_scores(res)
        out["seconds"][name] = time.perf_counter() - t0
        print(f"[{store.name}] {name}: " + ", ".join(f"{t} {r['value']:.3f}" for t, r in out["models"][name].items())
              + f" ({out['seconds'][name]:.0f} s)", flush=True)
    return out


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    se = row.get("stderr")
    return f"{row['value']:.3f}" + ("" if se is None else f" ± {se:.3f}")


def table(runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per store and model, one column per task (its primary metric ± standard error)."""
    tasks = sorted({t for r in runs for m in r["models"].values() for t in m})
    metric = {t: next(m[t]["metric"] for r in runs for m in r["models"].values() if t in m) for t in tasks}
    head = ["store", "bits/param", "model", *(f"{t} ({metric[t]})" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        bits = "-" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        for name, scores in r["models"].items():
            lines.append("| " + " | ".join([Path(r["store"]).name, bits, name, *(_cell(scores.get(t)) for t in tasks)])
                         + " |")
        for name, why in r["skipped"].items():
            lines.append("| " + " | ".join([Path(r["store"]).name, bits, name, *([f"skipped: {why}"] + [""] * (len(tasks) - 1))])
                         + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """Each task's mean score over a store's experts (solid) and the base's (dotted) against bits/param."""
    pts = [r for r in runs if r["bits_per_param"] is not None]
    if len(pts) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts.sort(key=lambda r: r["bits_per_param"])
    tasks = sorted({t for r in pts for m in r["models"].values() for t in m})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, t in enumerate(tasks):
        color = f"C{i}"
        xs, ys = [], []
        for r in pts:
            vals = [m[t]["value"] for n, m in r["models"].items() if n not in ("base", "auto") and t in m]
            if vals:
                xs.append(r["bits_per_param"])
                ys.append(sum(vals) / len(vals))
        ax.plot(xs, ys, "o-", color=color, label=t)
        base = [r["models"]["base"][t]["value"] for r in pts if t in r["models"].get("base", {})]
        if base:
            ax.axhline(base[0], color=color, ls=":", lw=1)
    ax.set_xlabel("bits per delta parameter (mean over the store's experts)")
    ax.set_ylabel("task score (mean over experts; dotted: base)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def splice(report: Path, section: str) -> None:
    """Put ``section`` between the markers in ``report`` (appended when they are absent)."""
    text = report.read_text() if report.is_file() else ""
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    report.write_text(text)


# ---- by domain (--by-domain): each expert on its own domain's tasks --------------------------------


def sweep_configs(zoo: str) -> list[tuple[str, Any]]:
    """``(suffix, CompressConfig)`` of the stores ``--sweep`` adds: GPTQ at 1/2/3 bits, BitDelta distilled.

    Each keeps the zoo's calibration sizes (``zoo_compress_config``); GPTQ runs without distillation
    (its own default), BitDelta with the zoo's distillation steps (its paper distils its scales).
    """
    from dataclasses import replace

    from meswitch.jobs.zoo_store import zoo_compress_config

    base = zoo_compress_config(zoo)
    steps = base.steps
    out = [(f"gptq{b}", replace(base, method="gptq", bits=b, distill_steps=0)) for b in (1, 2, 3)]
    return out + [("bitdelta", replace(base, method="bitdelta", bits=1, distill_steps=steps))]


def sweep_stores(first: Path, zoo: str) -> list[Path]:
    """The ``--sweep`` stores next to ``first`` (``<first>-gptq1`` ...), built or reused."""
    from meswitch.jobs.zoo_store import build_zoo_store

    stores = []
    for suffix, cfg in sweep_configs(zoo):
        store = first.parent / f"{first.name}-{suffix}"
        build_zoo_store(zoo, store, cfg, say=lambda m, s=store: print(f"[{s.name}] {m}", flush=True))
        stores.append(store)
    return stores


def domain_tasks(experts: list[str], spec: str | None,
                 installed: Callable[[str], bool] | None = None) -> dict[str, list[str]]:
    """``expert -> its domain's tasks``: ``spec`` ("math=t1+t2,code=t3"), else ``DOMAIN_TASKS`` by expert name.

    Experts with no tasks are left out; tasks ``installed`` refuses (say, HumanEval without its package) too.
    """
    from meswitch.harness.run import DOMAIN_TASKS

    if spec:
        table = {k.strip(): v.split("+") for k, _, v in (p.partition("=") for p in spec.split(",")) if v}
    else:
        table = {k: list(v) for k, v in DOMAIN_TASKS.items()}
    out = {}
    for name in experts:
        tasks = [t for t in table.get(name, []) if installed is None or installed(t)]
        if tasks:
            out[name] = tasks
    return out


def model_key(store: Any, name: str | None) -> dict[str, Any]:
    """What a model's scores depend on in ``store``: its stored delta's checksum (an expert), the base's
    fingerprint (``None``: the base), the active router and every delta (``"auto"``)."""
    base = store.base["fingerprint"]
    if name is None:
        return {"base": base}
    if name == "auto":
        router = store.extra.get("router", {})
        active = router.get("routers", {}).get(router.get("active"), {})
        return {"base": base, "router": active.get("files"),
                "experts": {n: store.expert_meta(n)["sha256"] for n in store.experts}}
    return {"base": base, "expert": store.expert_meta(name)["sha256"]}


def _run(label: str, make_lm: Callable[[], Any], tasks: list[str], limit: int | None, chat: bool,
         key: dict[str, Any] | None = None) -> tuple[dict[str, Any], float]:
    """The primary scores of the model ``make_lm()`` makes on ``tasks`` and the seconds they took. With ``key`` (what the model is:
    :func:`model_key`, or a checkpoint's identity) the scores are kept in the meswitch cache
    (``bench/tasks``) and reused by a later run of the same model, tasks, limit and template:
    ``make bench`` after an interrupted run, or a sweep added to a table already measured."""
    import hashlib
    from importlib.metadata import version

    from meswitch.harness.run import evaluate_tasks, primary_scores
    from meswitch.harness.tasks.heldout import VERSION as DATA_VERSION
    from meswitch.paths import cache_root

    path = None
    if key is not None and REUSE:
        ident = {"model": key, "tasks": sorted(tasks), "limit": limit, "chat": chat, "data": DATA_VERSION,
                 "lm_eval": version("lm_eval"), "meswitch": version("meswitch")}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        path = cache_root() / "bench" / "tasks" / f"{digest}.json"
        if path.is_file():
            hit = json.loads(path.read_text())
            print(f"[{label}] reused from {path}", flush=True)
            return hit["scores"], hit["seconds"]
    t0 = time.perf_counter()
    scores = primary_scores(evaluate_tasks(make_lm(), tasks, limit=limit, chat_template=chat))
    dt = time.perf_counter() - t0
    if path is not None:
        from meswitch.utils.atomic import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"ident": ident, "scores": scores, "seconds": dt}, indent=1))
    print(f"[{label}] " + ", ".join(f"{t} {r['value']:.3f}" for t, r in scores.items()) + f" ({dt:.0f} s)", flush=True)
    return scores, dt


def store_method(store: Any, expert: str) -> str:
    """How ``expert`` was compressed into ``store`` (a ``DeltaStore``): "gptq-mixed", "gptq 2-bit", ..."""
    cfg = store.expert_meta(expert).get("meta", {}).get("config", {})
    method = cfg.get("method", "?")
    label = f"{method} {cfg['bits']}-bit" if method in ("gptq", "rtn", "salient") and "bits" in cfg else method
    return label + ("+distill" if cfg.get("distill_steps") and method != "gptq-mixed" else "")


def evaluate_domains(store: Path, plan: dict[str, list[str]], everyone: bool, limit: int | None,
                     chat: bool, with_base: bool = True) -> dict[str, Any]:
    """One store: each expert of ``plan`` on its tasks; with ``everyone``, also the base and ``auto`` on all.

    Returns ``{store, experts: {name: {task: row}}, bits: {name: b}, method: {name: m}, base, auto, skipped,
    seconds}``.
    """
    from meswitch.engine import Engine
    from meswitch.front import load_store_router
    from meswitch.harness import register

    lm_cls = register()
    from meswitch.store.summary import summarize

    summary = summarize(store)
    engine = Engine.from_store(store)
    out: dict[str, Any] = {"store": str(store), "experts": {}, "bits": {}, "method": {}, "base": None, "auto": None,
                           "skipped": {}, "seconds": {}}
    for name, tasks in plan.items():
        if name not in engine.experts:
            out["skipped"][name] = f"not in {store.name}"
            continue
        out["bits"][name] = summary["experts"][name].get("bits_per_param")
        out["method"][name] = store_method(engine.store, name)
        out["experts"][name], out["seconds"][name] = _run(
            f"{store.name} {name}", lambda n=name: lm_cls(engine=engine, expert=n), tasks, limit, chat,
            model_key(engine.store, name))
    if everyone:
        every = [t for tasks in plan.values() for t in tasks]
        router = load_store_router(engine.store)
        if router is None:
            out["skipped"]["auto"] = "the store has no router (meswitch router train STORE)"
        else:
            out["auto"], out["seconds"]["auto"] = _run(f"{store.name} auto",
                                                       lambda: lm_cls(engine=engine, expert="auto", router=router),
                                                       every, limit, chat, model_key(engine.store, "auto"))
        if with_base:
            out["base"], out["seconds"]["base"] = _run(f"{store.name} base", lambda: lm_cls(engine=engine, expert=None),
                                                       every, limit, chat, model_key(engine.store, None))
    return out


def evaluate_uncompressed(store: Path, plan: dict[str, list[str]], limit: int | None, chat: bool,
                          batch_size: int = 16) -> dict[str, Any]:
    """Each expert's own checkpoint (the one ``store`` recorded) through lm-eval's Hugging Face model, fp32 CPU."""
    from lm_eval.models.huggingface import HFLM

    from meswitch.store import DeltaStore

    ds = DeltaStore.open(store)
    out: dict[str, Any] = {"experts": {}, "seconds": {}, "paths": {}, "skipped": {}}
    for name, tasks in plan.items():
        path = ds.expert_meta(name).get("meta", {}).get("reference_path") if name in ds.experts else None
        if not path or not Path(path, "config.json").is_file():
            out["skipped"][name] = "no checkpoint recorded (a LoRA adapter or a moved checkpoint)"
            continue
        weights = sorted(Path(path).glob("*.safetensors"))
        key = {"hf": path, "weights": [(w.name, w.stat().st_size, w.stat().st_mtime_ns) for w in weights]}
        out["paths"][name] = path
        out["experts"][name], out["seconds"][name] = _run(
            f"uncompressed {name}",
            lambda p=path: HFLM(pretrained=p, device="cpu", dtype="float32", batch_size=batch_size),
            tasks, limit, chat, key)
    return out


def domain_table(plan: dict[str, list[str]], runs: list[dict[str, Any]], hf: dict[str, Any] | None) -> str:
    """Markdown: one row per model (base, uncompressed, each store, auto), one column per task; a task's cell
    is the score of the expert of its domain (± standard error)."""
    tasks = [t for ts in plan.values() for t in ts]
    owner = {t: name for name, ts in plan.items() for t in ts}
    head = ["model", "bits/param", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, bits: str, cells: list[str]) -> None:
        lines.append("| " + " | ".join([label, bits, *cells]) + " |")

    first = runs[0]
    if first["base"] is not None:
        row("base (no delta)", "0", [_cell(first["base"].get(t)) for t in tasks])
    if hf is not None:
        row("uncompressed expert (lm-eval hf)", "16", [_cell(hf["experts"].get(owner[t], {}).get(t)) for t in tasks])
    for i, r in enumerate(runs):
        bits = [b for b in r["bits"].values() if b is not None]
        methods = sorted(set(r["method"].values()))
        label = f"{Path(r['store']).name}: {', '.join(methods)}" + (" (default)" if i == 0 else "")
        row(label, f"{sum(bits) / len(bits):.3f}" if bits else "-",
            [_cell(r["experts"].get(owner[t], {}).get(t)) for t in tasks])
    if first["auto"] is not None:
        row(f"auto ({Path(first['store']).name}, routed)", "-", [_cell(first["auto"].get(t)) for t in tasks])
    return "\n".join(lines)


def domain_checks(plan: dict[str, list[str]], first: dict[str, Any], hf: dict[str, Any] | None) -> list[str]:
    """The targets, as sentences: the default store's score per task against the uncompressed expert's
    (within max(its standard error, 0.01)), and ``auto`` against the named expert in points summed over domains."""
    out = []
    if hf is not None:
        for name, tasks in plan.items():
            for t in tasks:
                ref, got = hf["experts"].get(name, {}).get(t), first["experts"].get(name, {}).get(t)
                if ref is None or got is None:
                    continue
                tol = max(ref.get("stderr") or 0.0, 0.01)
                diff = got["value"] - ref["value"]
                verdict = "within" if abs(diff) <= tol or diff > 0 else "NOT within"
                out.append(f"- {t} ({name}): default {got['value']:.3f} vs uncompressed {ref['value']:.3f}, "
                           f"{100 * diff:+.1f} points, {verdict} the tolerance {100 * tol:.1f}")
    if first["auto"] is not None:
        total = 0.0
        parts = []
        for name, tasks in plan.items():
            diffs = [first["auto"][t]["value"] - first["experts"][name][t]["value"] for t in tasks
                     if t in first["auto"] and t in first["experts"].get(name, {})]
            if diffs:
                d = 100 * sum(diffs) / len(diffs)
                total += d
                parts.append(f"{name} {d:+.1f}")
        out.append(f"- auto against naming the right expert: {total:+.1f} points summed over the domains "
                   f"({', '.join(parts)}; each domain's mean over its tasks; target: no lower than -1.0)")
    return out


def domain_plot(plan: dict[str, list[str]], runs: list[dict[str, Any]], hf: dict[str, Any] | None,
                path: Path) -> bool:
    """One panel per task: the domain expert's score against its bits per parameter in each store (BitDelta
    marked apart), with the uncompressed expert and the base as horizontal lines."""
    tasks = [(name, t) for name, ts in plan.items() for t in ts]
    if not tasks or len(runs) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, t) in zip(axes.flat, tasks, strict=False):
        pts = [(r["bits"].get(name), r["experts"][name][t]["value"], r["method"].get(name, ""))
               for r in runs if t in r["experts"].get(name, {}) and r["bits"].get(name) is not None]
        line = sorted((b, v) for b, v, m in pts if not m.startswith("bitdelta"))
        if line:
            ax.plot([b for b, _ in line], [v for _, v in line], "o-", label="meswitch stores")
        bd = [(b, v) for b, v, m in pts if m.startswith("bitdelta")]
        if bd:
            ax.plot([b for b, _ in bd], [v for _, v in bd], "rx", ms=9, label="BitDelta")
        ref = (hf or {}).get("experts", {}).get(name, {}).get(t)
        if ref is not None:
            ax.axhline(ref["value"], color="k", ls="--", lw=1, label="uncompressed")
        if runs[0]["base"] is not None and t in runs[0]["base"]:
            ax.axhline(runs[0]["base"][t]["value"], color="gray", ls=":", lw=1, label="base")
        ax.set_title(f"{t} ({name})", fontsize=9)
        ax.set_xlabel("bits per delta parameter")
        ax.set_ylabel("score")
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def by_domain(args: argparse.Namespace) -> int:
    from meswitch.harness.run import task_installed
    from meswitch.store import DeltaStore

    stores = [s.expanduser() for s in args.store]
    if args.sweep:
        stores += sweep_stores(stores[0], args.zoo)
    plan = domain_tasks(DeltaStore.open(stores[0]).experts, args.domains, task_installed)
    if not plan:
        print("no expert of the first store has a domain with tasks (name them with --domains)", file=sys.stderr)
        return 2
    chat = not args.no_chat_template
    t0 = time.perf_counter()
    # the reference first, then the default store: the targets need those two before the sweep
    hf = evaluate_uncompressed(stores[0], plan, args.limit, chat) if args.hf else None
    runs = [evaluate_domains(s, plan, i == 0, args.limit, chat, not args.no_base) for i, s in enumerate(stores)]
    record = {"machine": machine(), "limit": args.limit, "chat_template": chat, "plan": plan, "runs": runs,
              "uncompressed": hf, "seconds": time.perf_counter() - t0}
    (args.results / "tasks.json").write_text(json.dumps(record, indent=2))
    md = domain_table(plan, runs, hf)
    checks = domain_checks(plan, runs[0], hf)
    (args.results / "tasks.md").write_text(md + "\n\n" + "\n".join(checks) + "\n")
    plotted = domain_plot(plan, runs, hf, args.results / "tasks_bits.png")
    limit = f"the first {args.limit} documents of each task" if args.limit else "every document"
    section = "\n".join([
        "## Task scores (lm-eval suites, docs/evaluation.md)", "",
        f"`python benchmarks/tasks.py --by-domain{' --sweep' if args.sweep else ''}{' --hf' if args.hf else ''}` "
        f"on {machine()}, {limit}, chat template {'on' if chat else 'off'}, {record['seconds'] / 60:.0f} min. "
        "Each expert is scored on its own domain's tasks (a column's cells are that domain's expert); "
        "each cell is the task's main metric ± its standard error.", "",
        md, "", *checks,
        *(["", "![task score against bits per parameter](results/tasks_bits.png)"] if plotted else []), ""])
    splice(args.report, section)
    print("\n" + md + "\n\n" + "\n".join(checks))
    print(f"\nwrote {args.results / 'tasks.json'}, {args.report}" + (", tasks_bits.png" if plotted else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, action="append", required=True, help="a store (repeat for several)")
    ap.add_argument("--models", help="comma-separated: base, expert names, auto (default: all of them)")
    ap.add_argument("--tasks", help="comma-separated tasks (default: the meswitch suite)")
    ap.add_argument("--limit", type=int, help="the first N documents of each task")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--results", type=Path, default=results_dir())
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--by-domain", action="store_true",
                    help="each expert on its own domain's tasks; base and auto on all, in the first store")
    ap.add_argument("--domains", help="--by-domain: EXPERT=TASK+TASK,... (default: harness.run.DOMAIN_TASKS)")
    ap.add_argument("--sweep", action="store_true",
                    help="--by-domain: also the zoo at GPTQ 1/2/3 bits and BitDelta, in stores next to the first")
    ap.add_argument("--zoo", choices=["full", "small"], default="full", help="--sweep: which zoo (default full)")
    ap.add_argument("--hf", action="store_true",
                    help="--by-domain: also each expert's uncompressed checkpoint through lm-eval's hf model")
    ap.add_argument("--no-base", action="store_true", help="--by-domain: leave the base's row out")
    ap.add_argument("--fresh", action="store_true", help="--by-domain: measure again, do not reuse cached scores")
    args = ap.parse_args(argv)
    if args.by_domain:
        global REUSE
        REUSE = not args.fresh
        return by_domain(args)
    models = args.models.split(",") if args.models else None
    tasks = args.tasks.split(",") if args.tasks else None
    t0 = time.perf_counter()
    runs = [evaluate_store(s.expanduser(), models, tasks, args.limit, not args.no_chat_template) for s in args.store]
    record = {"machine": machine(), "limit": args.limit, "chat_template": not args.no_chat_template, "runs": runs,
              "seconds": time.perf_counter() - t0}
    (args.results / "tasks.json").write_text(json.dumps(record, indent=2))
    md = table(runs)
    (args.results / "tasks.md").write_text(md + "\n")
    plotted = plot(runs, args.results / "tasks_bits.png")
    limit = f"the first {args.limit} documents of each task" if args.limit else "every document"
    section = "\n".join([
        "## Task scores (lm-eval suites, docs/evaluation.md)", "",
        f"`python benchmarks/tasks.py` on {machine()}, {limit}, chat template "
        f"{'on' if record['chat_template'] else 'off'}; each cell is the task's main metric ± its standard error.", "",
        md, *(["", "![task score against bits per parameter](results/tasks_bits.png)"] if plotted else []), ""])
    splice(args.report, section)
    print("\n" + md)
    print(f"\nwrote {args.results / 'tasks.json'}, {args.report}" + (", tasks_bits.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
