"""The reference zoo's experts, compressed into a store: built or reused, compressed only where stale."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from meswitch.compress.config import CompressConfig


def _quiet(_msg: str) -> None:
    """The default ``say``: no progress messages."""


def up_to_date(store: Path, name: str, expert_dir: Path, cfg: CompressConfig) -> bool:
    """True when ``store`` holds ``name`` made from ``expert_dir`` with ``cfg``, newer than the checkpoint.

    A missing or unreadable store or entry, another recipe (any field of ``cfg``), another checkpoint
    path, or a checkpoint whose ``meswitch.json`` marker is newer than the entry: False.
    """
    from dataclasses import asdict
    from datetime import datetime

    from meswitch.store import DeltaStore

    if not (store / "manifest.json").is_file():
        return False
    try:
        entry = DeltaStore.open(store).expert_meta(name)
    except Exception:  # noqa: BLE001 - missing or unreadable: compress again
        return False
    meta = entry.get("meta", {})
    stored = meta.get("config", {})
    if any(stored.get(k) != v for k, v in asdict(cfg).items()):
        return False
    if Path(meta.get("reference_path", "")).resolve() != expert_dir.resolve():
        return False
    created = datetime.fromisoformat(entry["created"]).timestamp()
    marker = expert_dir / "meswitch.json"
    return marker.is_file() and marker.stat().st_mtime < created


# The small zoo's recipe: the default method and budget, calibrated on its own 128-token blocks with fewer
# of them and fewer distillation steps, so that `meswitch demo --size small` (the tests' demo) compresses
# three experts in about a minute instead of eight. The full zoo keeps ``CompressConfig()``.
SMALL_ZOO_CONFIG = CompressConfig(calib_blocks=8, calib_len=128, hessian_blocks=8, eval_blocks=2, distill_steps=6)


def zoo_compress_config(size: str) -> CompressConfig:
    """The recipe the ``size`` zoo's experts are compressed with by default (see ``SMALL_ZOO_CONFIG``)."""
    return SMALL_ZOO_CONFIG if size == "small" else CompressConfig()


def build_zoo_store(size: str, store: Path, cfg: CompressConfig | None = None,
                    say: Callable[[str], None] = _quiet) -> list[str]:
    """Build (or reuse) the ``size`` reference zoo, then compress into ``store`` every expert of it that
    the store lacks or holds from another recipe (:func:`up_to_date`), each calibrated on its own
    domain's text. ``cfg``: the recipe (default ``CompressConfig()``); ``say``: progress messages.
    Returns the names of the experts compressed now.
    """
    from meswitch.data.examples import read_jsonl
    from meswitch.jobs.compress_store import compress_into_store
    from meswitch.zoo.build import ZooPaths, build_zoo, expert_calibration, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    cfg = cfg or zoo_compress_config(size)
    say(f"zoo: building or reusing the {size} reference zoo")
    build_zoo(size)
    paths = ZooPaths(zoo_dir(size))
    experts = {n: paths.expert(n) for n, _ in get_recipe(size).experts}
    todo = {n: d for n, d in experts.items() if not up_to_date(store, n, d, cfg)}
    if kept := sorted(set(experts) - set(todo)):
        say(f"compress: {', '.join(kept)} already in {store} with the same recipe")
    if todo:
        say(f"compress: {', '.join(todo)} -> {store} ({cfg.method}, {cfg.budget} bits per parameter)")
        calib = {n: read_jsonl(p) for n, p in expert_calibration(size, paths).items() if n in todo}
        compress_into_store(paths.base, todo, store, calib, cfg)
    return list(todo)
