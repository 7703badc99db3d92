"""Out-of-distribution figures for a router recipe: leave-one-source-out (LOSO) and risk-coverage.

LOSO: for every source ``s`` of a labelled corpus (``meswitch.router.corpus``), a head is trained (and
its temperature fitted) on every other source, then scored on ``s``'s examples, labels from the
source. Per-source accuracy, the worst source and the macro average over sources predict what a user
whose queries come from a source the router never saw gets; in-distribution accuracy does not.
Every held-out prediction is pooled for the calibration error (ECE) and the risk-coverage curve.

Shapes: ``N`` texts, ``F`` features, ``C`` domains. The encoder runs once per corpus (features are
cached by ``encode_cached``); only heads are retrained per source.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.data.examples import Example
from meswitch.router.calibrate import expected_calibration_error, fit_temperature, reliability
from meswitch.router.errors import RouterDataError

if TYPE_CHECKING:
    import torch

    from meswitch.router.encoders import Encoder

COVERAGE_LEVELS = tuple(range(10, 101, 10))


def risk_coverage(confidence: Sequence[float], correct: Sequence[bool],
                  levels: Sequence[int] = COVERAGE_LEVELS) -> list[dict[str, float]]:
    """Accuracy of the most confident ``c``% of queries, for each ``c`` in ``levels``.

    Queries are sorted by confidence, highest first (ties keep their order); each row is
    ``{"coverage": c, "threshold": the lowest confidence kept, "accuracy", "count"}``. A router whose
    threshold is that confidence answers about ``c``% of such queries itself at that accuracy and
    sends the rest to the fallback.
    """
    if len(confidence) != len(correct):
        raise ValueError(f"{len(confidence)} confidences for {len(correct)} outcomes")
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    out = []
    for c in levels:
        k = max(1, round(len(order) * c / 100)) if order else 0
        kept = order[:k]
        out.append({"coverage": float(c), "count": k,
                    "threshold": float(confidence[kept[-1]]) if kept else 1.0,
                    "accuracy": sum(bool(correct[i]) for i in kept) / k if k else 0.0})
    return out


def encode_cached(encoder: Encoder, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
    """``encoder.encode(texts)``, with each text's features cached under ``cache_root()/router-features``
    (one file per encoder spec, rows keyed by the text's SHA-256; only texts not cached yet are encoded).

    int8 activations are scaled per batch, so a cached row can differ slightly from the same text
    encoded in another batch; the cache keeps the first.
    """
    import torch
    from safetensors.torch import save_file

    from meswitch.paths import cache_root

    if not texts:
        return encoder.encode([])
    spec = hashlib.sha256(json.dumps(encoder.spec(), sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root() / "router-features" / f"{spec}.safetensors"
    index_path = path.with_suffix(".json")
    keys = [hashlib.sha256(t.encode("utf-8", "replace")).hexdigest() for t in texts]
    index, x = _read_feature_cache(path)
    missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in index}.items())
    if missing:
        new = encoder.encode([t for _, t in missing], progress=progress)
        index, x = _read_feature_cache(path)  # again: another process may have added rows meanwhile
        fresh = [i for i, (k, _) in enumerate(missing) if k not in index]
        for i in fresh:
            index[missing[i][0]] = len(index)
        rows = new[torch.tensor(fresh, dtype=torch.long)]
        x = rows if x is None else torch.cat([x, rows])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": x.contiguous()}, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
        index_path.write_text(json.dumps(sorted(index, key=index.__getitem__)))
    assert x is not None
    return x[torch.tensor([index[k] for k in keys], dtype=torch.long)]


def _read_feature_cache(path: Path) -> tuple[dict[str, int], torch.Tensor | None]:
    """``({text sha256: row}, features)`` of a feature cache file, or ``({}, None)`` if absent or torn."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index_path = path.with_suffix(".json")
    try:
        keys = json.loads(index_path.read_text())
        x = load_file(str(path))["x"]
    except (OSError, ValueError, KeyError, SafetensorError):
        return {}, None
    if x.shape[0] != len(keys):
        return {}, None
    return {k: i for i, k in enumerate(keys)}, x


@dataclass(frozen=True)
class HeadRecipe:
    """How each LOSO head is trained: as ``RouterTrainConfig`` trains the saved router's head."""

    kind: str = "mlp"  # mlp | linear | scores (a per-class bias on score features)
    hidden: int = 128
    epochs: int = 40
    val_fraction: float = 0.15
    threshold: float = 0.5
    fallback_domain: str = "general"
    seed: int = 0


def fit_head(x: torch.Tensor, y: torch.Tensor, classes: int, recipe: HeadRecipe) -> tuple[dict, float]:
    """A head on ``x: [N, F]``, ``y: [N]`` and its temperature, fitted on a stratified validation split.

    ``recipe.kind == "scores"``: features that are already class scores (``llm-choice``, ``expert-lik``)
    get a per-class bias only (``score_head``)."""
    from meswitch.router.head import head_logits, score_head, train_head
    from meswitch.router.train import stratified_split

    train_idx, val_idx = stratified_split(y.tolist(), recipe.val_fraction, recipe.seed)
    if recipe.kind == "scores":
        head = score_head(x[train_idx], y[train_idx], classes)
    else:
        head = train_head(x[train_idx], y[train_idx], classes, kind=recipe.kind, hidden=recipe.hidden,
                          epochs=recipe.epochs, seed=recipe.seed)
    return head, fit_temperature(head_logits(head, x[val_idx]).detach(), y[val_idx])


def leave_one_source_out(examples: Sequence[Example], x: torch.Tensor, recipe: HeadRecipe = HeadRecipe(),
                         progress: bool = False) -> dict[str, Any]:
    """LOSO over the sources of ``examples`` (features ``x: [N, F]``, one row per example).

    Returns ``{"domains", "per_source": {source: {"domain", "n", "accuracy", "top1_accuracy", "ece"}},
    "worst": {"source", "accuracy"}, "macro", "macro_by_domain", "ece", "reliability", "risk_coverage",
    "queries"}``. ``accuracy`` is what routing gives (below ``recipe.threshold`` the query goes to the
    fallback domain's expert); ``top1_accuracy`` ignores the threshold.
    """
    import torch

    from meswitch.router.head import head_logits

    if len(examples) != len(x):
        raise RouterDataError(f"{len(examples)} examples but {len(x)} feature rows")
    domains = sorted({e.domain for e in examples})
    sources = sorted({e.source for e in examples})
    if len(domains) < 2 or len(sources) < 2:
        raise RouterDataError(f"LOSO needs 2+ domains and 2+ sources, got {domains} and {sources}")
    y = torch.tensor([domains.index(e.domain) for e in examples])
    fallback = domains.index(recipe.fallback_domain) if recipe.fallback_domain in domains else None
    per_source: dict[str, dict[str, Any]] = {}
    all_conf: list[float] = []
    all_correct: list[bool] = []
    for s in sources:
        test = torch.tensor([i for i, e in enumerate(examples) if e.source == s])
        train = torch.tensor([i for i, e in enumerate(examples) if e.source != s])
        if len(set(y[train].tolist())) < len(domains):
            raise RouterDataError(f"without source {s!r} some domain has no training text")
        head, temperature = fit_head(x[train], y[train], len(domains), recipe)
        with torch.no_grad():
            probs = torch.softmax(head_logits(head, x[test]) / temperature, dim=-1)
        conf, pred = probs.max(-1)
        routed = pred.clone()
        if fallback is not None:
            routed[conf < recipe.threshold] = fallback
        hit = pred == y[test]
        per_source[s] = {"domain": examples[int(test[0])].domain, "n": len(test),
                         "accuracy": float((routed == y[test]).float().mean()),
                         "top1_accuracy": float(hit.float().mean()), "ece": expected_calibration_error(conf, hit)}
        all_conf += conf.tolist()
        all_correct += hit.tolist()
        if progress:
            print(f"  LOSO {s:32s} {per_source[s]['accuracy']:.3f}", flush=True)
    worst = min(per_source, key=lambda s: per_source[s]["accuracy"])
    by_domain = {d: [r["accuracy"] for r in per_source.values() if r["domain"] == d] for d in domains}
    c, k = torch.tensor(all_conf), torch.tensor(all_correct)
    return {
        "domains": domains, "queries": len(examples), "per_source": per_source,
        "worst": {"source": worst, "accuracy": per_source[worst]["accuracy"]},
        "macro": sum(r["accuracy"] for r in per_source.values()) / len(per_source),
        "macro_by_domain": {d: sum(v) / len(v) for d, v in by_domain.items() if v},
        "ece": expected_calibration_error(c, k), "reliability": reliability(c, k),
        "risk_coverage": risk_coverage(all_conf, all_correct),
    }


def score_fixed_head(examples: Sequence[Example], x: torch.Tensor, head: dict, temperature: float,
                     domains: Sequence[str], recipe: HeadRecipe = HeadRecipe()) -> dict[str, Any]:
    """Per-source accuracy of one trained head (e.g. an older recipe's) on ``examples``, in LOSO's format."""
    import torch

    from meswitch.router.head import head_logits

    with torch.no_grad():
        probs = torch.softmax(head_logits(head, x) / temperature, dim=-1)
    conf, pred = probs.max(-1)
    y = torch.tensor([list(domains).index(e.domain) for e in examples])
    routed = pred.clone()
    if recipe.fallback_domain in domains:
        routed[conf < recipe.threshold] = list(domains).index(recipe.fallback_domain)
    per_source: dict[str, dict[str, Any]] = {}
    for s in sorted({e.source for e in examples}):
        idx = torch.tensor([i for i, e in enumerate(examples) if e.source == s])
        hit = pred[idx] == y[idx]
        per_source[s] = {"domain": examples[int(idx[0])].domain, "n": len(idx),
                         "accuracy": float((routed[idx] == y[idx]).float().mean()),
                         "top1_accuracy": float(hit.float().mean()),
                         "ece": expected_calibration_error(conf[idx], hit)}
    worst = min(per_source, key=lambda s: per_source[s]["accuracy"])
    hit = pred == y
    return {"domains": list(domains), "queries": len(examples), "per_source": per_source,
            "worst": {"source": worst, "accuracy": per_source[worst]["accuracy"]},
            "macro": sum(r["accuracy"] for r in per_source.values()) / len(per_source),
            "ece": expected_calibration_error(conf, hit), "reliability": reliability(conf, hit),
            "risk_coverage": risk_coverage(conf.tolist(), hit.tolist())}


def loso_table(result: dict[str, Any]) -> list[list[Any]]:
    """Rows ``[source, domain, n, accuracy, top-1, ECE]`` sorted by domain then accuracy, for printing."""
    rows = sorted(result["per_source"].items(), key=lambda kv: (kv[1]["domain"], kv[1]["accuracy"]))
    return [[s, r["domain"], r["n"], r["accuracy"], r["top1_accuracy"], r["ece"]] for s, r in rows]


def corpus_loso(per_source: int = 300, seed: int = 0, sources: Sequence[str] | None = None,
                encoder_spec: dict[str, Any] | None = None, recipe: HeadRecipe = HeadRecipe(),
                progress: bool = False) -> dict[str, Any]:
    """LOSO on ``build_corpus(per_source, seed, sources)`` with a ``minilm`` encoder (``encoder_spec``,
    default: the default router's); adds ``"per_source_cap"``, ``"seed"`` and ``"encoder"`` to the result."""
    from meswitch.router.corpus import build_corpus
    from meswitch.router.encoders import build_encoder, clean_text, default_spec

    spec = encoder_spec or default_spec("minilm")
    if spec.get("kind") != "minilm":
        raise RouterDataError(f"LOSO retrains heads over the minilm encoder only, not {spec.get('kind')!r}")
    examples = build_corpus(per_source, seed, sources)
    encoder = build_encoder(spec, sorted({e.domain for e in examples}))
    x = encode_cached(encoder, [clean_text(e.text) for e in examples], progress=progress)
    out = leave_one_source_out(examples, x, recipe, progress=progress)
    return out | {"per_source_cap": per_source, "seed": seed, "encoder": encoder.spec()}
