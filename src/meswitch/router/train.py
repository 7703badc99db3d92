"""Training a router: labelled text -> features -> head -> temperature on a validation split.

Shapes: ``N`` texts, ``F`` features, ``C`` domains.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.data.examples import Example
from meswitch.router.calibrate import expected_calibration_error, fit_temperature
from meswitch.router.encoders import ENCODERS, build_encoder, clean_text, default_spec
from meswitch.router.errors import RouterDataError, UnmappedDomainError
from meswitch.router.head import head_logits, score_head, train_head
from meswitch.router.router import Router, RouterConfig

if TYPE_CHECKING:
    from meswitch.store import DeltaStore


@dataclass(frozen=True)
class RouterTrainConfig:
    """How to train a router. ``threshold``: below this calibrated confidence the fallback expert is used."""

    encoder: str = "minilm"
    head: str = "mlp"  # linear | mlp (llm-choice and expert-lik always use a per-domain bias on their scores)
    hidden: int = 128
    epochs: int = 40
    val_fraction: float = 0.15
    threshold: float = 0.5
    fallback: str | None = None  # default: the expert of domain "general", else of the largest domain
    max_per_domain: int | None = None  # subsample each domain (the base-model encoders are slow)
    max_tokens: int | None = None  # encoder's token limit (default: the encoder's own)
    layer: int | None = None  # base-probe: which block's states (default: 2/3 of the depth)
    seed: int = 0


def resolve_domain_map(domains: Sequence[str], experts: Sequence[str], explicit: Mapping[str, str]) -> dict[str, str]:
    """``{domain: expert}``: ``explicit`` entries, else the expert named like the domain.

    UnmappedDomainError naming every domain that maps to no expert of the store, and every mapping
    to an expert the store does not hold.
    """
    bad_targets = {d: e for d, e in explicit.items() if e not in experts}
    if bad_targets:
        raise UnmappedDomainError(
            f"--map names experts the store does not hold: {bad_targets}; the store has {sorted(experts)}"
        )
    out = {d: explicit.get(d, d) for d in domains}
    unmapped = sorted(d for d, e in out.items() if e not in experts)
    if unmapped:
        raise UnmappedDomainError(
            f"training labels {unmapped} map to no expert (the store has {sorted(experts)}); "
            "pass --map DOMAIN=EXPERT for each, or drop those lines"
        )
    return out


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``fraction`` of each class (at least one) goes to val, seeded."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for idx in by_class.values():
        rng.shuffle(idx)
        k = max(1, round(len(idx) * fraction))
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def _prepare(examples: Sequence[Example], cfg: RouterTrainConfig) -> tuple[list[str], list[str], dict[str, Any]]:
    """Cleaned texts and their domains (empty texts dropped, each domain capped), and a summary."""
    rng = random.Random(cfg.seed)
    by_domain: dict[str, list[Example]] = {}
    dropped = 0
    for e in examples:
        text = clean_text(e.text)
        if not text or not e.domain:
            dropped += 1
            continue
        by_domain.setdefault(e.domain, []).append(Example(text, e.domain, source=e.source))
    if len(by_domain) < 2:
        raise RouterDataError(f"a router needs labelled text of at least 2 domains, got {sorted(by_domain) or 'none'}")
    small = {d: len(v) for d, v in by_domain.items() if len(v) < 4}
    if small:
        raise RouterDataError(f"too few examples (need >= 4 per domain for a validation split): {small}")
    texts, domains = [], []
    for d in sorted(by_domain):
        rows = by_domain[d]
        if cfg.max_per_domain and len(rows) > cfg.max_per_domain:
            rows = rng.sample(rows, cfg.max_per_domain)
        texts += [e.text for e in rows]
        domains += [d] * len(rows)
    sources = Counter(f"{d}:{e.source.split('+')[0].split('/')[0] or '?'}" for d in by_domain for e in by_domain[d])
    summary = {"examples": len(texts), "dropped_empty": dropped, "per_domain": dict(Counter(domains)),
               "sources": dict(sorted(sources.items()))}
    return texts, domains, summary


def train_router(
    store: DeltaStore,
    examples: Sequence[Example],
    cfg: RouterTrainConfig = RouterTrainConfig(),
    domain_map: Mapping[str, str] | None = None,
    base: tuple[Any, Any] | None = None,
    progress: bool = False,
) -> Router:
    """A router for ``store`` trained on labelled ``examples`` (not yet saved: call ``router.save(store)``).

    ``base`` = (model, tokenizer) of the store's base, needed by every encoder but ``minilm`` (loaded
    from the store's recorded base path when not given); ``expert-lik`` and ``minilm+lik`` score the
    text with the store's experts through an engine over it.
    """
    import torch

    from meswitch.router.router import load_store_base

    if cfg.encoder not in ENCODERS:
        raise RouterDataError(f"unknown encoder {cfg.encoder!r}; expected one of {', '.join(ENCODERS)}")
    texts, labels, summary = _prepare(examples, cfg)
    domains = sorted(set(labels))
    mapping = resolve_domain_map(domains, store.experts, domain_map or {})
    fallback = cfg.fallback or mapping.get("general") or mapping[Counter(labels).most_common(1)[0][0]]
    if fallback not in store.experts:
        raise UnmappedDomainError(f"fallback expert {fallback!r} is not in the store ({store.experts})")

    spec = default_spec(cfg.encoder)
    if cfg.max_tokens:
        spec["max_tokens"] = cfg.max_tokens
    if cfg.layer:
        spec["options"]["layer"] = cfg.layer
    if cfg.encoder in ("expert-lik", "minilm+lik"):
        spec["options"]["experts"] = [mapping[d] for d in domains]  # column c: the likelihood of domain c's expert
    if cfg.encoder != "minilm" and base is None:
        base = load_store_base(store)
    encoder = build_encoder(spec, domains, base, store=store)
    y = torch.tensor([domains.index(d) for d in labels])
    train_idx, val_idx = stratified_split(y.tolist(), cfg.val_fraction, cfg.seed)
    x = encoder.encode(texts, progress=progress)
    if x.isnan().any():
        raise RouterDataError(f"{store.path}: some experts could not be scored, so no {cfg.encoder} router can be "
                              f"trained: {getattr(encoder, 'errors', {})}")
    if cfg.encoder in ("llm-choice", "expert-lik"):
        head_name = "scores"
        head = score_head(x[train_idx], y[train_idx], len(domains))
    else:
        head_name = cfg.head
        head = train_head(x[train_idx], y[train_idx], len(domains), kind=cfg.head, hidden=cfg.hidden,
                          epochs=cfg.epochs, seed=cfg.seed)
    with torch.no_grad():
        val_logits = head_logits(head, x[val_idx])
    temperature = fit_temperature(val_logits, y[val_idx])
    probs = torch.softmax(val_logits / temperature, dim=-1)
    conf, pred = probs.max(-1)
    correct = pred == y[val_idx]
    summary |= {
        "val_examples": len(val_idx),
        "val_accuracy": float(correct.float().mean()),
        "val_ece": expected_calibration_error(conf, correct),
        "val_ece_uncalibrated": expected_calibration_error(*_conf_correct(val_logits, y[val_idx])),
        "config": asdict(cfg),
    }
    config = RouterConfig(
        encoder=encoder.spec(), head=head_name, domains=domains, domain_map=mapping, temperature=temperature,
        threshold=cfg.threshold, fallback=fallback, base_fingerprint=store.base["fingerprint"],
        experts=store.experts, training=summary,
    )
    return Router(config, encoder, head)


def _conf_correct(logits: Any, y: Any) -> tuple[Any, Any]:
    import torch

    conf, pred = torch.softmax(logits, dim=-1).max(-1)
    return conf, pred == y


def default_training_examples(store: DeltaStore, zoo: Path | None = None, broad: bool = True,
                              n_per_style: int | None = None, seed: int = 0, corpus: bool = True) -> list[Example]:
    """The zoo's training text for ``store`` (the zoo its base came from, or ``zoo``), plus, with
    ``broad``, the text of ``meswitch.router.data.broad_training_examples``: with ``corpus`` the
    packaged multi-source corpus (a third of ``n_per_style`` per source), else the previous broad
    styles (``n_per_style`` each). ``n_per_style`` defaults to a twelfth of the zoo's text, 32..400."""
    from meswitch.data.examples import read_jsonl
    from meswitch.router.data import broad_training_examples
    from meswitch.zoo.build import ZooPaths

    root = zoo or (Path(store.extra["base_path"]).parent if store.extra.get("base_path") else None)
    if root is None:
        raise RouterDataError(f"{store.path}: no zoo recorded for this store; pass --data FILE.jsonl or --zoo")
    path = ZooPaths(Path(root)).split(None, "train")
    if not path.is_file():
        raise RouterDataError(f"{path}: no zoo training text there; pass --data FILE.jsonl")
    train = read_jsonl(path)
    if not broad:
        return train
    n = n_per_style or max(32, min(400, len(train) // 12))
    return train + broad_training_examples(train, n, seed, corpus)
