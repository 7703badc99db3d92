"""The router: a calibrated domain classifier whose decisions name a store's experts.

Stored inside the delta store it routes for::

    STORE/router/<encoder>/config-<sha>.json       RouterConfig (encoder spec, domains, map, T, ...)
    STORE/router/<encoder>/head-<sha>.safetensors  the head's tensors
    manifest.json extra["router"] = {"format", "version", "active": <encoder>,
                                     "routers": {<encoder>: {"files": {name: {path, bytes, sha256}}, ...}}}

Files are named by their content hash and written atomically before the manifest names them, so
a crash leaves the previous router in force. One router per encoder kind is kept; ``active`` is
the one ``load_router`` returns by default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.router.encoders import Encoder, build_encoder, clean_text
from meswitch.router.errors import CorruptRouterError, RouterError, RouterMismatchError
from meswitch.router.head import Head, head_kind, head_logits
from meswitch.router.likelihood import LIKELIHOOD_KINDS
from meswitch.utils.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import torch

    from meswitch.store import DeltaStore

FORMAT = "meswitch-router"
FORMAT_VERSION = 1
EXTRA_KEY = "router"
ROUTER_DIR = "router"


@dataclass(frozen=True)
class RouteDecision:
    """Where one text goes. ``top_k``: the ``k`` most probable domains as ``(domain, probability)``.

    ``warnings``: what went wrong on the way without stopping the decision (a likelihood router that
    could not load an expert routes among the others and says so here).
    """

    expert: str
    domain: str
    confidence: float
    fallback: bool
    top_k: list[tuple[str, float]]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouterConfig:
    """Everything about a router but its head's tensors; saved as JSON, unknown keys ignored."""

    encoder: dict[str, Any]
    head: str
    domains: list[str]
    domain_map: dict[str, str]
    temperature: float
    threshold: float
    fallback: str
    base_fingerprint: str
    experts: list[str]
    training: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RouterConfig:
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise CorruptRouterError(f"router config is missing fields: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Router:
    """A trained router: ``route(texts)`` -> one ``RouteDecision`` per text."""

    def __init__(self, config: RouterConfig, encoder: Encoder, head: Head):
        self.config, self.encoder, self.head = config, encoder, head
        classes = len(config.domains)
        out = head["b"] if head_kind(head) == "linear" else head["b2"]
        if out.shape != (classes,):
            raise CorruptRouterError(f"router head has {tuple(out.shape)} outputs for {classes} domains")
        missing = sorted(set(config.domains) - set(config.domain_map))
        if missing:
            raise CorruptRouterError(f"router domains {missing} map to no expert")

    def __repr__(self) -> str:
        return f"Router({self.config.encoder['kind']}, domains={self.config.domains}, fallback={self.config.fallback!r})"

    @property
    def experts(self) -> list[str]:
        """The experts it can route to: every mapped one and the fallback."""
        return sorted({*self.config.domain_map.values(), self.config.fallback})

    @property
    def kind(self) -> str:
        return str(self.config.encoder["kind"])

    def probabilities(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Calibrated ``[N, C]`` domain probabilities of non-empty (cleaned) ``texts``."""
        return self._probabilities(texts, batch_size)[0]

    def _probabilities(self, texts: Sequence[str], batch_size: int = 64
                       ) -> tuple[torch.Tensor, list[str], set[int]]:
        """``(probabilities [N, C], warnings, the domains skipped)``. The likelihood encoders mark an expert they could not
        score with NaN in its domain's column (the last ``C`` features): that feature is replaced by its
        training mean, the domain gets probability 0 (the rest renormalised) and a warning names it."""
        import torch

        feats = self.encoder.encode(list(texts), batch_size=batch_size)
        c = len(self.config.domains)
        warnings: list[str] = []
        skipped: set[int] = set()
        missing = None
        if self.kind in LIKELIHOOD_KINDS:
            missing = feats[:, -c:].isnan()  # [N, C]
            if missing.any():
                feats = torch.where(feats.isnan(), self.head["mu"].expand_as(feats), feats)
                errors = getattr(self.encoder, "errors", {})
                skipped = set(missing.any(0).nonzero().flatten().tolist())
                for j in sorted(skipped):
                    d = self.config.domains[j]
                    e = self.config.domain_map[d]
                    warnings.append(f"expert {e!r} could not be scored, so domain {d!r} was skipped: "
                                    f"{errors.get(e, 'unavailable')}")
        with torch.inference_mode():
            logits = head_logits(self.head, feats) / self.config.temperature
            if missing is not None and missing.any():
                logits = logits.masked_fill(missing, float("-inf"))
            return torch.softmax(logits, dim=-1).nan_to_num(0.0), warnings, skipped

    def route(self, texts: Sequence[str], top_k: int = 1, batch_size: int = 64) -> list[RouteDecision]:
        """One decision per text, in order.

        A text that is empty after cleaning (``clean_text``: whitespace only, or "") goes to the
        fallback expert with ``fallback=True``, ``confidence=0.0``, the fallback's domain (or "")
        and an empty ``top_k``. Below ``threshold`` confidence the fallback expert is used too.
        Long texts are truncated (``clean_text``, then the encoder's token limit).
        """
        if isinstance(texts, str | bytes):
            raise RouterError("route takes a list of texts, not a single string")
        k = max(1, min(int(top_k), len(self.config.domains)))
        cleaned = [clean_text(t, self.config.encoder.get("max_chars", 4096)) for t in texts]
        live = [i for i, t in enumerate(cleaned) if t]
        out: list[RouteDecision | None] = [None] * len(cleaned)
        warnings: list[str] = []
        if live:
            probs, warnings, skipped = self._probabilities([cleaned[i] for i in live], batch_size=batch_size)
            top_p, top_i = probs.topk(k, dim=-1)
            for row, i in enumerate(live):
                ranked = [(self.config.domains[int(j)], float(p)) for n, (p, j) in enumerate(zip(top_p[row], top_i[row],
                          strict=True)) if n == 0 or int(j) not in skipped]  # a skipped domain is not ranked
                out[i] = self._decide(ranked, tuple(warnings))
        empty = self._empty_decision()
        return [d if d is not None else empty for d in out]

    def _decide(self, ranked: list[tuple[str, float]], warnings: tuple[str, ...] = ()) -> RouteDecision:
        domain, conf = ranked[0]
        below = conf < self.config.threshold
        expert = self.config.fallback if below else self.config.domain_map[domain]
        return RouteDecision(expert=expert, domain=domain, confidence=conf, fallback=below, top_k=ranked,
                             warnings=warnings)

    def _empty_decision(self) -> RouteDecision:
        home = [d for d in self.config.domains if self.config.domain_map[d] == self.config.fallback]
        return RouteDecision(expert=self.config.fallback, domain=home[0] if home else "", confidence=0.0,
                             fallback=True, top_k=[])

    # ---- storage ---------------------------------------------------------------------------------

    def save(self, store: DeltaStore, activate: bool = True) -> dict[str, Any]:
        """Write this router into ``store`` (files first, then the manifest entry); returns the entry.

        The entry of the other encoder kinds is read and written back: two trainers saving into one
        store at the same moment may drop each other's entry (rerun one); neither leaves a broken one.
        """
        from safetensors.torch import save as save_bytes

        check_for_store(self.config, store)
        kind = self.kind
        blobs = {
            "config": (json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
            "head": save_bytes({k: v.contiguous() for k, v in self.head.items()},
                               metadata={"format": FORMAT, "encoder": kind}),
        }
        suffix = {"config": "json", "head": "safetensors"}
        files = {}
        for name, data in blobs.items():
            sha = hashlib.sha256(data).hexdigest()
            rel = f"{ROUTER_DIR}/{kind}/{name}-{sha[:16]}.{suffix[name]}"
            atomic_write_bytes(store.path / rel, data)
            files[name] = {"path": rel, "bytes": len(data), "sha256": sha}
        entry = {"files": files, "domains": list(self.config.domains), "domain_map": dict(self.config.domain_map),
                 "fallback": self.config.fallback, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        old = store.extra.get(EXTRA_KEY) or {}
        routers = dict(old.get("routers") or {})
        previous = routers.get(kind)
        routers[kind] = entry
        active = kind if activate or not old.get("active") else old["active"]
        store.set_extra(EXTRA_KEY, {"format": FORMAT, "version": FORMAT_VERSION, "active": active, "routers": routers})
        if previous:  # the files the old entry named, unless the new one names the same bytes
            keep = {f["path"] for f in files.values()}
            for f in previous.get("files", {}).values():
                if f.get("path") not in keep:
                    _inside(store, f.get("path", "")).unlink(missing_ok=True)
        return entry


def check_for_store(config: RouterConfig, store: DeltaStore) -> None:
    """RouterMismatchError unless ``config`` was made for ``store``'s base and names only its experts."""
    fp = store.base["fingerprint"]
    if config.base_fingerprint != fp:
        raise RouterMismatchError(
            f"{store.path}: the router was trained for a store with base {config.base_fingerprint[:16]}..., "
            f"this store's base is {fp[:16]}...; train a router for this store (meswitch router train)"
        )
    wanted = sorted({*config.domain_map.values(), config.fallback})
    missing = [e for e in wanted if e not in store.experts]
    if missing:
        raise RouterMismatchError(
            f"{store.path}: the router routes to expert(s) {missing} that the store does not hold "
            f"(it has {store.experts}); retrain it or map those domains elsewhere (--map DOMAIN=EXPERT)"
        )


def _inside(store: DeltaStore, rel: str) -> Path:
    path = store.path / rel
    if not rel or not path.resolve().is_relative_to((store.path / ROUTER_DIR).resolve()):
        raise CorruptRouterError(f"{store.path}: router file {rel!r} lies outside {ROUTER_DIR}/")
    return path


def _read_verified(store: DeltaStore, name: str, info: dict[str, Any]) -> bytes:
    try:
        path = _inside(store, str(info["path"]))
        data = path.read_bytes()
    except KeyError:
        raise CorruptRouterError(f"{store.path}: router entry for {name!r} names no file") from None
    except OSError as exc:
        raise CorruptRouterError(f"{store.path}: router {name} file {info.get('path')!r} is unreadable: {exc}") from exc
    if len(data) != info.get("bytes") or hashlib.sha256(data).hexdigest() != info.get("sha256"):
        raise CorruptRouterError(f"{path}: router {name} file does not match the sha256/size the manifest records")
    return data


def stored_routers(store: DeltaStore) -> dict[str, Any]:
    """The manifest's router entry (``{}`` when the store has none)."""
    entry = store.extra.get(EXTRA_KEY) or {}
    if entry and entry.get("format") != FORMAT:
        raise CorruptRouterError(f"{store.path}: extra[{EXTRA_KEY!r}] is not a {FORMAT} entry")
    if entry and int(entry.get("version", 0)) > FORMAT_VERSION:
        raise CorruptRouterError(f"{store.path}: router format {entry['version']} is newer than this meswitch reads")
    return entry


def read_router_config(store: DeltaStore, kind: str | None = None) -> tuple[RouterConfig, dict[str, Any]] | None:
    """``(config, manifest entry)`` of the stored router ``kind`` (default: the active one), verified."""
    entry = stored_routers(store)
    if not entry:
        return None
    kind = kind or entry.get("active")
    routers = entry.get("routers") or {}
    if kind not in routers:
        raise RouterError(f"{store.path}: no {kind!r} router; stored: {sorted(routers) or 'none'}")
    files = routers[kind].get("files") or {}
    if "config" not in files or "head" not in files:
        raise CorruptRouterError(f"{store.path}: router {kind!r} entry lacks its config or head file")
    try:
        raw = json.loads(_read_verified(store, "config", files["config"]))
    except ValueError as exc:
        raise CorruptRouterError(f"{store.path}: router {kind!r} config is not JSON: {exc}") from exc
    config = RouterConfig.from_dict(raw)
    if config.format != FORMAT or config.version > FORMAT_VERSION:
        raise CorruptRouterError(f"{store.path}: router config format {config.format} v{config.version} not readable")
    return config, routers[kind]


def load_router(store: DeltaStore, kind: str | None = None, base: tuple[Any, Any] | None = None) -> Router | None:
    """The store's router (the active one, or encoder ``kind``), or None if the store has none.

    ``base``: the store's base as ``(model, tokenizer)``, for the ``base-probe`` and ``llm-choice``
    encoders (an engine passes the base it already holds); without it the base is loaded from the
    path the store records and checked against the store's fingerprint. The likelihood encoders
    (``expert-lik``, ``minilm+lik``) build their own scoring :class:`~meswitch.engine.Engine` over
    ``base``: pass one that no other engine wraps (or none: a fresh copy is loaded).
    RouterMismatchError if the router was made for another store; CorruptRouterError if a file differs
    from what the manifest records.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    found = read_router_config(store, kind)
    if found is None:
        return None
    config, entry = found
    check_for_store(config, store)
    data = _read_verified(store, "head", entry["files"]["head"])
    try:
        head = load_bytes(data)
    except SafetensorError as exc:
        raise CorruptRouterError(f"{store.path}: router head is not safetensors: {exc}") from exc
    if config.encoder.get("kind") != "minilm" and base is None:
        base = load_store_base(store)
    return Router(config, build_encoder(config.encoder, config.domains, base, store=store), head)


def load_store_base(store: DeltaStore, base_dir: Path | None = None) -> tuple[Any, Any]:
    """The store's base model and tokenizer, from ``base_dir`` or the path the store records; fingerprint-checked."""
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import fingerprint_model

    path = base_dir or store.extra.get("base_path")
    if not path:
        raise RouterError(f"{store.path}: the store records no base_path; pass the base checkpoint directory")
    model, tok = load_checkpoint(Path(path))
    if fingerprint_model(model) != store.base["fingerprint"]:
        raise RouterMismatchError(f"{path}: this checkpoint is not the base of store {store.path} (fingerprint differs)")
    return model, tok


def describe_routers(store: DeltaStore) -> dict[str, dict[str, Any]]:
    """``{encoder kind: summary}`` of every router stored in ``store`` (for ``meswitch inspect``).

    Reads only the (verified) configs; a router that fails verification is listed with its ``error``.
    """
    entry = stored_routers(store)
    out: dict[str, dict[str, Any]] = {}
    for kind, info in sorted((entry.get("routers") or {}).items()):
        row: dict[str, Any] = {"active": kind == entry.get("active"), "domain_map": info.get("domain_map"),
                               "fallback": info.get("fallback"), "created": info.get("created")}
        try:
            config = read_router_config(store, kind)[0]  # type: ignore[index]
            check_for_store(config, store)
            t = config.training
            row |= {"threshold": config.threshold, "temperature": config.temperature, "head": config.head,
                    "examples": t.get("examples"), "val_accuracy": t.get("val_accuracy"), "val_ece": t.get("val_ece")}
        except RouterError as exc:
            row["error"] = str(exc)
        out[kind] = row
    return out
