"""Evaluating a router on labelled text: accuracy, confusion, calibration, fallback rate, speed.

A query counts as correct when the expert the router picks is the expert its domain maps to; a
query whose domain maps to no expert of the router is always an error. Accuracy is the macro
average over the domains present in the data.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meswitch.data.examples import Example
from meswitch.router.calibrate import expected_calibration_error, reliability
from meswitch.router.errors import RouterDataError
from meswitch.router.loso import risk_coverage

if TYPE_CHECKING:
    from meswitch.router.router import RouteDecision, Router

FALLBACK_COLUMN = "(fallback)"


def score_decisions(router: Router, examples: Sequence[Example], decisions: Sequence[RouteDecision]) -> dict[str, Any]:
    """Accuracy, per-domain and per-source accuracy, confusion (true domain -> chosen expert), ECE,
    fallback rate and the risk-coverage curve.

    ``ece`` is over the calibrated top-domain confidence against "the top domain is the true one",
    on the queries whose domain the router knows; ``risk_coverage`` (``meswitch.router.loso``) is
    the top-1 accuracy of the most confident c% of those queries. ``top1_accuracy`` ignores the
    threshold. ``per_source``: routed accuracy per ``Example.source`` (examples without one under "").
    """
    import torch

    mapping = router.config.domain_map
    domains = sorted({e.domain for e in examples})
    columns = [*router.experts]
    confusion = {d: dict.fromkeys(columns, 0) for d in domains}
    hits: dict[str, list[bool]] = {d: [] for d in domains}
    top1: dict[str, list[bool]] = {d: [] for d in domains}
    conf, correct = [], []
    by_source: dict[str, list[bool]] = {}
    for e, dec in zip(examples, decisions, strict=True):
        want = mapping.get(e.domain)
        confusion[e.domain][dec.expert] += 1
        hits[e.domain].append(want is not None and dec.expert == want)
        by_source.setdefault(e.source, []).append(hits[e.domain][-1])
        top1[e.domain].append(want is not None and dec.domain == e.domain)
        if e.domain in mapping and dec.top_k:
            conf.append(dec.confidence)
            correct.append(dec.domain == e.domain)
    per_domain = {d: sum(v) / len(v) for d, v in hits.items()}
    c, k = torch.tensor(conf, dtype=torch.float32), torch.tensor(correct, dtype=torch.bool)
    return {
        "queries": len(examples),
        "accuracy": sum(per_domain.values()) / len(per_domain),
        "per_domain": per_domain,
        "per_source": {s: {"n": len(v), "accuracy": sum(v) / len(v)} for s, v in sorted(by_source.items())},
        "top1_accuracy": sum(sum(v) / len(v) for v in top1.values()) / len(top1),
        "unknown_domains": sorted(d for d in domains if d not in mapping),
        "confusion": confusion,
        "ece": expected_calibration_error(c, k),
        "reliability": reliability(c, k),
        "risk_coverage": risk_coverage(conf, correct),
        "fallback_rate": sum(d.fallback for d in decisions) / len(decisions),
    }


def latency(router: Router, texts: Sequence[str], repeats: int = 1) -> dict[str, float]:
    """Per-query wall time at batch 1 (p50, p99 in ms) and throughput at batch 64 (queries/s)."""
    import statistics

    times = []
    router.route([texts[0]])  # warm-up
    for _ in range(repeats):
        for t in texts:
            t0 = time.perf_counter()
            router.route([t])
            times.append(time.perf_counter() - t0)
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    batch = list(texts[:64]) * (64 // max(1, len(texts[:64])))
    t0 = time.perf_counter()
    router.route(batch, batch_size=64)
    elapsed = time.perf_counter() - t0
    return {"latency_ms_p50": 1000 * statistics.median(times), "latency_ms_p99": 1000 * p99,
            "throughput_qps_b64": len(batch) / elapsed}


def evaluate(router: Router, examples: Sequence[Example], latency_queries: int = 200,
             progress: bool = False) -> dict[str, Any]:
    """``score_decisions`` on ``examples`` plus ``latency`` over (up to) ``latency_queries`` of them."""
    if not examples:
        raise RouterDataError("no examples to evaluate the router on")
    decisions = router.route([e.text for e in examples])
    out = score_decisions(router, examples, decisions)
    if latency_queries > 0:
        step = max(1, len(examples) // latency_queries)
        out |= latency(router, [e.text for e in examples[::step][:latency_queries]])
    out["encoder"] = router.kind
    return out


def plot_risk_coverage(ax: Any, curves: dict[str, list[dict[str, float]]], title: str = "risk-coverage") -> None:
    """Accuracy of the most confident c% against c, one line per curve, on a matplotlib axis."""
    for label, rc in curves.items():
        ax.plot([r["coverage"] for r in rc], [r["accuracy"] for r in rc], "o-", label=label)
    lows = [r["accuracy"] for rc in curves.values() for r in rc]
    ax.set(xlabel="coverage: % of queries routed by confidence (rest to the fallback)", ylabel="accuracy",
           xlim=(5, 102), ylim=(min(0.9, min(lows, default=0.9) - 0.02), 1.005), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_eval(result: dict[str, Any], path: str) -> None:
    """A reliability diagram, the confusion matrix and the risk-coverage curve side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    rel = result["reliability"]
    a.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    a.bar([r["confidence"] for r in rel], [r["accuracy"] for r in rel], width=1 / 15, alpha=0.6, edgecolor="k")
    a.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
          title=f"reliability (ECE {result['ece']:.3f})")
    rows = list(result["confusion"])
    cols = list(next(iter(result["confusion"].values())))
    m = [[result["confusion"][r][c] for c in cols] for r in rows]
    b.imshow(m, cmap="Blues")
    b.set_xticks(range(len(cols)), cols)
    b.set_yticks(range(len(rows)), rows)
    b.set(xlabel="routed to expert", ylabel="true domain", title=f"confusion (macro acc {result['accuracy']:.3f})")
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            b.text(j, i, str(v), ha="center", va="center")
    plot_risk_coverage(c, {"top-1 domain": result["risk_coverage"]})
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
