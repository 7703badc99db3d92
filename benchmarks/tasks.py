"""Task scores (meswitch's lm-eval suites) of the base, each expert and ``auto`` on one or more stores.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/tasks.py --store ~/.cache/meswitch/stores/full [--store S2 ...]
        [--models base,math,code,general,auto] [--tasks meswitch_mc_math,...] [--limit 50]

Every model of a store runs on one engine (``meswitch.harness``, every request of a task handed to
the engine at once). ``auto`` routes each request with the store's router (skipped, and said so, when
the store has none). Writes docs/results/tasks.{json,md}, puts the table into docs/RESULTS.md between
``<!-- tasks:begin -->`` and ``<!-- tasks:end -->`` (appended when absent) and, with several stores
(say, one per bit setting), docs/results/tasks_bits.png: each task's mean expert score against bits per parameter.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- tasks:begin -->", "<!-- tasks:end -->"


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, action="append", required=True, help="a store (repeat for several)")
    ap.add_argument("--models", help="comma-separated: base, expert names, auto (default: all of them)")
    ap.add_argument("--tasks", help="comma-separated tasks (default: the meswitch suite)")
    ap.add_argument("--limit", type=int, help="the first N documents of each task")
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--results", type=Path, default=results_dir())
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = ap.parse_args(argv)
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
