"""Build the reference zoo: base checkpoint, domain splits, fine-tuned experts, perplexity report.

Layout of a zoo directory (each entry written atomically and verified before it is reused)::

    base/                   Hugging Face checkpoint of the (possibly truncated) base
    experts/<name>/         one fine-tuned checkpoint per expert
    data/<domain>.{train,test}.jsonl, data/{train,test}.jsonl
    report.json             paths, perplexity table, |delta|/|W|, wall times, recipe

Every stage is keyed by the recipe; a stage whose entry is missing, incomplete, corrupted or made
from another recipe is rebuilt, so a killed build resumes at the stage it was in.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from meswitch.data.examples import Example, read_jsonl, write_jsonl
from meswitch.errors import CacheError, ZooBuildError
from meswitch.model.checkpoint import (
    load_checkpoint,
    load_packaged_base,
    packaged_gguf_path,
    save_checkpoint,
    truncate_layers,
    verify_checkpoint,
)
from meswitch.paths import cache_root
from meswitch.utils.atomic import atomic_dir, atomic_write_json, clean_stale_tmp
from meswitch.utils.lock import file_lock
from meswitch.zoo.recipe import ZooRecipe, get_recipe


@dataclass(frozen=True)
class ZooPaths:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    def expert(self, name: str) -> Path:
        return self.root / "experts" / name

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, domain: str | None, split: str) -> Path:
        return self.data / (f"{domain}.{split}.jsonl" if domain else f"{split}.jsonl")

    @property
    def report(self) -> Path:
        return self.root / "report.json"


def expert_calibration(size: str, paths: ZooPaths) -> dict[str, Path]:
    """Each expert's calibration text: the training split of its own domain (never its test split)."""
    from meswitch.zoo.recipe import get_recipe

    return {name: paths.split(domain, "train") for name, domain in get_recipe(size).experts}


def zoo_dir(size: str, out: Path | None = None) -> Path:
    """Where the zoo of ``size`` lives: ``out`` if given, else ``<cache>/zoo/<size>``."""
    get_recipe(size)
    return Path(out) if out else cache_root() / "zoo" / size


def _log(msg: str) -> None:
    import sys

    print(f"[meswitch zoo] {msg}", file=sys.stderr, flush=True)


def _is_valid(path: Path, meta: dict[str, Any]) -> bool:
    try:
        verify_checkpoint(path, meta)
        return True
    except CacheError as exc:
        if path.exists():
            _log(f"rebuilding {path}: {exc}")
        return False


def source_base_dir() -> Path:
    return cache_root() / "source" / "smollm2-135m-instruct"


def ensure_source_base() -> Path:
    """The packaged GGUF dequantized once into a regular fp32 checkpoint, shared by every zoo size."""
    gguf = packaged_gguf_path()
    meta = {"role": "source", "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    path = source_base_dir()
    if not _is_valid(path, meta):
        _log(f"dequantizing {gguf.name} into {path}")
        model, tok = load_packaged_base()
        save_checkpoint(model, tok, path, meta)
    return path


def _ensure_base(recipe: ZooRecipe, paths: ZooPaths) -> dict[str, Any]:
    meta = {"role": "base", "recipe": recipe.key()}
    if not _is_valid(paths.base, meta):
        model, tok = load_checkpoint(ensure_source_base())
        if recipe.num_layers is not None:
            truncate_layers(model, recipe.num_layers)
        save_checkpoint(model, tok, paths.base, meta)
    return meta


def _ensure_data(recipe: ZooRecipe, paths: ZooPaths) -> None:
    from meswitch.data.sources import domain_examples

    marker = paths.data / "meswitch.json"
    try:
        ok = json.loads(marker.read_text()).get("recipe") == recipe.key()
        ok = ok and all(paths.split(d, s).is_file() for d in recipe.domains for s in ("train", "test"))
    except (OSError, ValueError):
        ok = False
    if ok:
        return
    _log("drawing domain text and held-out splits")
    with atomic_dir(paths.data) as tmp:
        train_all: list[Example] = []
        test_all: list[Example] = []
        counts = {}
        for i, domain in enumerate(recipe.domains):
            pool = domain_examples(domain, recipe.n_test + recipe.n_train, recipe.seed + 1000 * i)
            test, train = pool[: recipe.n_test], pool[recipe.n_test :]
            if len(test) < recipe.n_test or not train:
                raise ZooBuildError(f"domain {domain!r}: only {len(pool)} examples available")
            write_jsonl(tmp / f"{domain}.test.jsonl", test)
            write_jsonl(tmp / f"{domain}.train.jsonl", train)
            test_all += test
            train_all += train
            counts[domain] = {"train": len(train), "test": len(test)}
        write_jsonl(tmp / "train.jsonl", train_all)
        write_jsonl(tmp / "test.jsonl", test_all)
        (tmp / "meswitch.json").write_text(json.dumps({"recipe": recipe.key(), "counts": counts}, indent=2))


def _ensure_expert(recipe: ZooRecipe, paths: ZooPaths, index: int, name: str, domain: str) -> None:
    from meswitch.data.chat import pack_blocks
    from meswitch.zoo.train import TrainConfig, finetune

    meta = {"role": "expert", "recipe": recipe.key(), "name": name, "domain": domain}
    if _is_valid(paths.expert(name), meta):
        return
    import torch

    model, tok = load_checkpoint(paths.base)
    train = read_jsonl(paths.split(domain, "train"))
    ids, mask = pack_blocks(train, tok, recipe.block_len, recipe.max_example_len)
    cfg = TrainConfig(
        steps=recipe.steps, batch_size=recipe.batch_size, lr=recipe.lr, warmup_steps=recipe.warmup_steps,
        min_lr_ratio=recipe.min_lr_ratio, seed=recipe.seed + index,
    )
    torch.manual_seed(cfg.seed)
    _log(f"fine-tuning expert {name!r} on {domain}: {len(ids)} blocks of {recipe.block_len} tokens, {cfg.steps} steps")
    start = time.perf_counter()
    losses = finetune(model, ids, mask, cfg, desc=f"expert {name}")
    meta_info = {"losses": losses, "train_s": round(time.perf_counter() - start, 1)}
    save_checkpoint(model, tok, paths.expert(name), meta, info=meta_info)


def delta_ratio(base: Any, expert: Any) -> float:
    """||W_expert - W_base||_F / ||W_base||_F over every linear weight of the decoder blocks."""
    import torch

    num = den = 0.0
    b = base.state_dict()
    with torch.no_grad():
        for name, p in expert.state_dict().items():
            if ".layers." in name and p.dim() == 2:
                num += float(torch.sum((p - b[name]) ** 2))
                den += float(torch.sum(b[name] ** 2))
    return (num / den) ** 0.5


def _report(recipe: ZooRecipe, paths: ZooPaths) -> dict[str, Any]:
    from meswitch.eval.perplexity import perplexity
    from meswitch.model.checkpoint import read_marker

    test = {d: read_jsonl(paths.split(d, "test"))[: recipe.n_ppl] for d in recipe.domains}
    ppl: dict[str, dict[str, float]] = {}
    rel: dict[str, float] = {}
    train_s: dict[str, float] = {}
    base, tok = load_checkpoint(paths.base)
    ppl["base"] = {d: perplexity(base, tok, ex, recipe.max_example_len) for d, ex in test.items()}
    for name, _ in recipe.experts:
        expert, _tok = load_checkpoint(paths.expert(name))
        ppl[name] = {d: perplexity(expert, tok, ex, recipe.max_example_len) for d, ex in test.items()}
        rel[name] = delta_ratio(base, expert)
        train_s[name] = (read_marker(paths.expert(name)) or {}).get("info", {}).get("train_s")
        del expert
    return {
        "recipe": {"key": recipe.key(), **asdict(recipe)},
        "paths": {
            "root": str(paths.root),
            "base": str(paths.base),
            "experts": {n: str(paths.expert(n)) for n, _ in recipe.experts},
            "train": str(paths.split(None, "train")),
            "test": str(paths.split(None, "test")),
            "splits": {d: {s: str(paths.split(d, s)) for s in ("train", "test")} for d in recipe.domains},
        },
        "ppl": ppl,
        "delta_rel": rel,
        "train_s": train_s,
    }


def check_contract(report: dict[str, Any], recipe: ZooRecipe) -> list[str]:
    """Experts that fail to beat the base on their own domain by ``recipe.min_gain``, as messages."""
    bad = []
    for name, domain in recipe.experts:
        base, mine = report["ppl"]["base"][domain], report["ppl"][name][domain]
        if mine > (1 - recipe.min_gain) * base:
            bad.append(
                f"expert {name!r}: perplexity {mine:.3f} on {domain} held-out text is not {recipe.min_gain:.0%} "
                f"below the base's {base:.3f}"
            )
    return bad


def build_zoo(size: str = "full", out: Path | None = None) -> dict[str, Any]:
    """Build (or reuse) the zoo of ``size`` and return its report; raise ZooBuildError if it misses its contract."""
    recipe = get_recipe(size)
    paths = ZooPaths(zoo_dir(size, out))
    # one builder per zoo directory: a second one waits, then finds the work done
    with file_lock(paths.root / ".lock", on_wait=lambda: _log(f"waiting for another build of {paths.root}")):
        return _build_locked(recipe, paths)


def _build_locked(recipe: ZooRecipe, paths: ZooPaths) -> dict[str, Any]:
    t0 = time.perf_counter()
    for parent in (paths.root, paths.root / "experts"):  # what killed builds left behind
        for name in ("base", "data", *(n for n, _ in recipe.experts)):
            clean_stale_tmp(parent, name)
    _ensure_base(recipe, paths)
    _ensure_data(recipe, paths)
    for i, (name, domain) in enumerate(recipe.experts):
        _ensure_expert(recipe, paths, i, name, domain)
    report = None
    try:
        cached = json.loads(paths.report.read_text())
        if cached.get("recipe", {}).get("key") == recipe.key():
            report = cached
    except (OSError, ValueError):
        pass
    if report is None:
        _log("measuring perplexity of base and experts on held-out text")
        report = _report(recipe, paths)
        report["build_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(paths.report, report)
    failures = check_contract(report, recipe)
    if failures:
        raise ZooBuildError("the zoo misses its perplexity contract:\n  " + "\n  ".join(failures)
                            + f"\n(report kept at {paths.report})")
    return report
