"""``meswitch generate`` and ``Engine.from_store`` on a tiny store with a saved base checkpoint."""

from __future__ import annotations

import json

import pytest

from meswitch.cli import main
from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.model.checkpoint import save_checkpoint
from meswitch.store import DeltaStore
from meswitch.store.errors import BaseMismatchError
from tests.engine_helpers import make_store, perturbed, tiny_base


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm_tokenizer):
    root = tmp_path_factory.mktemp("gen")
    base = tiny_base()
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    store = make_store(root / "store", base, {"a": perturbed(base, 1), "b": perturbed(base, 2)},
                       method="salient", bits=2, k=8)
    store.set_extra("base_path", str(root / "base"))
    return root, store


def test_from_store_loads_the_recorded_base_and_matches_a_direct_engine(saved, smollm_tokenizer):
    root, store = saved
    eng = Engine.from_store(root / "store")
    assert eng.experts == ["a", "b"]
    r = Request(prompt="Hello", expert="b", params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    direct = Engine(store, tiny_base(), smollm_tokenizer, EngineConfig())
    assert eng.generate(r)[0].token_ids == direct.generate(r)[0].token_ids
    save_checkpoint(tiny_base(seed=5), smollm_tokenizer, root / "other", {"role": "base"})
    with pytest.raises(BaseMismatchError):
        Engine.from_store(root / "store", base=root / "other")


def test_generate_cli_json_and_errors(saved, capsys):
    root, _ = saved
    rc = main(["generate", str(root / "store"), "Hi", "What is 2+2?", "--expert", "a", "--max-tokens", "4",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and [c["expert"] for c in out] == ["a", "a"]
    assert all(c["usage"]["completion_tokens"] <= 4 for c in out)
    assert main(["generate", str(root / "store"), "Hi", "--expert", "zzz"]) == 2
    assert "no expert 'zzz'" in capsys.readouterr().err
    assert main(["generate", str(root / "store"), "Hi", "--max-tokens", "0"]) == 2
    assert main(["generate", str(root / "store"), "Hi", "--expert", "auto"]) == 2  # the store has no router
    assert "expert 'auto' needs a router" in capsys.readouterr().err


def test_generate_cli_runs_on_the_backend_it_is_given(saved, capsys):
    root, _ = saved
    args = ["generate", str(root / "store"), "Hi", "--expert", "a", "--max-tokens", "4", "--json"]
    assert main([*args, "--backend", "reference"]) == 0
    exact = json.loads(capsys.readouterr().out)
    assert main([*args, "--backend", "pytorch"]) == 0  # same float32 arithmetic, products from the parts
    assert json.loads(capsys.readouterr().out)[0]["token_ids"] == exact[0]["token_ids"]
    assert main([*args, "--backend", "fast"]) == 2
    assert "unknown delta backend 'fast'" in capsys.readouterr().err


def test_the_engine_says_which_backend_it_chose(saved, smollm_tokenizer):
    _, store = saved
    eng = Engine(store, tiny_base(), smollm_tokenizer, EngineConfig(backend="triton"))  # no GPU here
    assert eng.backend_selection.backend.name == "pytorch"
    assert "triton: the triton backend runs on CUDA devices only" in eng.backend_selection.describe()
    assert eng.stats()["backend"] == "pytorch on cpu"


def test_from_store_names_a_broken_file_at_start_up_and_serves_the_other_experts(saved, tmp_path, caplog):
    """Start-up checks each file's presence and size (no hashing); a truncated file's expert fails its requests."""
    import logging
    import shutil

    root, _ = saved
    shutil.copytree(root / "store", tmp_path / "store")
    store = DeltaStore.open(tmp_path / "store")
    path = store.path / store.expert_meta("a")["file"]
    path.write_bytes(path.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="meswitch.engine.engine"):
        eng = Engine.from_store(tmp_path / "store")
    assert "1 of 2 expert files cannot be served" in caplog.text and "'a' file is truncated" in caplog.text
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    bad, good = eng.generate([Request(prompt="Hi", expert="a", params=p), Request(prompt="Hi", expert="b", params=p)])
    assert bad.finish_reason == "error" and "truncated" in bad.error
    assert good.finish_reason == "length" and len(good.token_ids) == 3
