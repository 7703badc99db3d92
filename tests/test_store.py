"""The delta store: round trips, manifest contents, integrity checks, names, crashes, concurrency."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import meswitch.store.store as store_module
from meswitch.errors import MeswitchError
from meswitch.store import (
    FORMAT_VERSION,
    BaseMismatchError,
    CorruptStoreError,
    DeltaStore,
    ExpertExistsError,
    InvalidEntryError,
    InvalidNameError,
    InvalidTensorError,
    StoreError,
    StoreNotFoundError,
    StoreVersionError,
    UnknownExpertError,
    base_info,
    fingerprint_model,
    fingerprint_state_dict,
)

FP = "f" * 64
INFO = {"architecture": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "vocab_size": 128, "num_parameters": 1234}


def make_expert(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Two linear layers of a delta: packed uint8 codes, fp16 scales, int64 salient indices, fp32 values."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.up_proj": {
            "q": torch.randint(0, 256, (8, 4), dtype=torch.uint8, generator=g),
            "scale": torch.randn(8, 1, generator=g).to(torch.float16),
            "salient_idx": torch.randint(0, 32, (3,), dtype=torch.int64, generator=g),
            "salient_val": torch.randn(3, generator=g),
        }
        for i in range(2)
    } | {"model.layers.0.self_attn.q_proj": {"bias": torch.randn(5, generator=g).to(torch.bfloat16)}}


def layer_meta(layers) -> dict[str, dict]:
    return {name: {"method": "salient-int4", "bits": 4, "salient": 3} for name in layers}


def add(store: DeltaStore, name: str, seed: int = 0, **kw):
    layers = make_expert(seed)
    store.add_expert(name, layers, layer_meta(layers), {"method": "salient-int4", "bits": 4, "seed": seed}, **kw)
    return layers


def assert_layers_equal(got, want) -> None:
    assert got.keys() == want.keys()
    for layer, fields in want.items():
        assert got[layer].keys() == fields.keys(), layer
        for field, t in fields.items():
            assert got[layer][field].dtype == t.dtype, (layer, field)
            assert torch.equal(got[layer][field], t), (layer, field)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def raw_manifest(store: DeltaStore) -> dict:
    return json.loads((store.path / "manifest.json").read_text())


def write_manifest(store: DeltaStore, manifest: dict) -> None:
    (store.path / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def store(tmp_path: Path) -> DeltaStore:
    return DeltaStore.create(tmp_path / "store", FP, INFO)


# ---- round trip and manifest ---------------------------------------------------------------------

def test_round_trip_two_experts(store: DeltaStore) -> None:
    a, b = add(store, "math", seed=1), add(store, "chat", seed=2)
    assert store.experts == ["chat", "math"]
    for name, want in (("math", a), ("chat", b)):
        got, entry = store.load_expert(name)
        assert_layers_equal(got, want)
        assert entry == store.expert_meta(name)
        got, _ = store.load_expert(name, verify=False)
        assert_layers_equal(got, want)


def test_manifest_records_sizes_hashes_and_tensors(store: DeltaStore) -> None:
    layers = add(store, "math", seed=1)
    m = raw_manifest(store)
    assert m["format"] == "meswitch-store" and m["format_version"] == FORMAT_VERSION == 1
    assert m["base"] == {"fingerprint": FP, **INFO} == store.base
    entry = m["experts"]["math"]
    path = store.path / "experts" / "math.safetensors"
    assert entry["file"] == "experts/math.safetensors"
    assert entry["bytes"] == path.stat().st_size == store.total_bytes("math")
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["meta"] == {"method": "salient-int4", "bits": 4, "seed": 1}
    assert datetime.fromisoformat(entry["created"]).utcoffset() == timezone.utc.utcoffset(None)
    assert entry["layers"].keys() == layers.keys()
    for name, fields in layers.items():
        info = entry["layers"][name]
        assert info["method"] == "salient-int4" and info["bits"] == 4 and info["salient"] == 3
        assert info["bytes"] == sum(t.numel() * t.element_size() for t in fields.values())
        assert info["tensors"] == {
            f: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for f, t in fields.items()
        }
        assert len(info["sha256"]) == 64


def test_reopen_from_disk(store: DeltaStore) -> None:
    layers = add(store, "math", seed=3)
    store.set_extra("router", {"kind": "centroid", "experts": ["math"]})
    again = DeltaStore.open(store.path, expect_fingerprint=FP)
    assert again.experts == ["math"] and again.base["fingerprint"] == FP
    assert again.extra == {"router": {"kind": "centroid", "experts": ["math"]}}
    assert_layers_equal(again.load_expert("math")[0], layers)
    again.verify(expect_fingerprint=FP)


def test_remove_expert(store: DeltaStore) -> None:
    add(store, "math")
    add(store, "chat")
    store.remove_expert("math")
    assert store.experts == ["chat"]
    assert not (store.path / "experts" / "math.safetensors").exists()
    with pytest.raises(UnknownExpertError):
        store.remove_expert("math")


def test_other_instance_sees_writes(store: DeltaStore) -> None:
    other = DeltaStore.open(store.path)
    assert other.experts == []
    add(store, "math")
    assert other.experts == ["math"]


# ---- base identity -------------------------------------------------------------------------------

def test_create_reuses_store_with_same_base(store: DeltaStore) -> None:
    add(store, "math")
    again = DeltaStore.create(store.path, FP, {"architecture": "ignored"})
    assert again.experts == ["math"] and again.base == {"fingerprint": FP, **INFO}


def test_create_with_other_base_raises(store: DeltaStore) -> None:
    with pytest.raises(BaseMismatchError) as exc:
        DeltaStore.create(store.path, "0" * 64, INFO)
    msg = str(exc.value)
    assert FP in msg and "0" * 64 in msg and str(store.path) in msg


def test_open_checks_expected_fingerprint(store: DeltaStore) -> None:
    with pytest.raises(BaseMismatchError):
        DeltaStore.open(store.path, expect_fingerprint="0" * 64)
    with pytest.raises(BaseMismatchError):
        store.verify(expect_fingerprint="0" * 64)


def test_open_missing_store(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        DeltaStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreNotFoundError, match="manifest.json"):
        DeltaStore.open(tmp_path / "empty")


def test_create_refuses_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CorruptStoreError, match="notes.txt"):
        DeltaStore.create(tmp_path, FP, INFO)
    assert tree(tmp_path) == {"notes.txt", ".lock"}


# ---- integrity -----------------------------------------------------------------------------------

def test_truncated_file(store: DeltaStore) -> None:
    add(store, "math")
    path = store.path / "experts" / "math.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptStoreError, match="truncated") as exc:
        store.load_expert("math")
    assert str(path) in str(exc.value)
    with pytest.raises(CorruptStoreError, match="truncated"):
        store.verify()
    with pytest.raises(CorruptStoreError, match="safetensors"):
        store.load_expert("math", verify=False)


def test_flipped_byte(store: DeltaStore) -> None:
    add(store, "math")
    add(store, "chat", seed=1)
    path = store.path / "experts" / "math.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="sha256") as exc:
        store.load_expert("math")
    assert str(path) in str(exc.value)
    with pytest.raises(CorruptStoreError, match="1 of 2"):
        store.verify()
    store.load_expert("chat")


def test_unparseable_file_with_matching_hash(store: DeltaStore) -> None:
    add(store, "math")
    path = store.path / "experts" / "math.safetensors"
    path.write_bytes(b"\xff" * 16)
    m = raw_manifest(store)
    m["experts"]["math"].update(bytes=16, sha256=hashlib.sha256(b"\xff" * 16).hexdigest())
    write_manifest(store, m)
    with pytest.raises(CorruptStoreError, match="safetensors") as exc:
        store.load_expert("math")
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.update(zero={"dtype": "float32", "shape": [2]}), "field 'zero' is missing from the file"),
        (lambda t: t.pop("scale"), "field 'scale' is not in the manifest"),
        (lambda t: t["q"].update(dtype="int8"), "field 'q' is"),
        (lambda t: t["q"].update(shape=[4, 8]), "field 'q' is"),
    ],
)
def test_layer_differs_from_manifest(store: DeltaStore, edit, match: str) -> None:
    add(store, "math")
    m = raw_manifest(store)
    edit(m["experts"]["math"]["layers"]["model.layers.1.mlp.up_proj"]["tensors"])
    write_manifest(store, m)
    with pytest.raises(CorruptStoreError, match=match) as exc:
        store.load_expert("math")
    assert "model.layers.1.mlp.up_proj" in str(exc.value)


def test_layer_hash_differs_from_manifest(store: DeltaStore) -> None:
    add(store, "math")
    m = raw_manifest(store)
    m["experts"]["math"]["layers"]["model.layers.0.mlp.up_proj"]["sha256"] = "0" * 64
    write_manifest(store, m)
    with pytest.raises(CorruptStoreError, match="layer 'model.layers.0.mlp.up_proj' sha256"):
        store.load_expert("math")


def test_newer_format_version(store: DeltaStore) -> None:
    m = raw_manifest(store)
    m["format_version"] = 99
    write_manifest(store, m)
    with pytest.raises(StoreVersionError, match=r"store format 99 is newer than this meswitch supports \(1\)"):
        DeltaStore.open(store.path)


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": "something-else", "format_version": 1}'])
def test_bad_manifest(store: DeltaStore, text: str) -> None:
    (store.path / "manifest.json").write_text(text)
    with pytest.raises(CorruptStoreError, match="manifest.json"):
        DeltaStore.open(store.path)


# ---- names and inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "a..b", "tab\there", "new\n"])
def test_invalid_names_write_nothing(tmp_path: Path, store: DeltaStore, name: str) -> None:
    before = tree(tmp_path)
    with pytest.raises(InvalidNameError) as exc:
        add(store, name)
    assert repr(name) in str(exc.value)
    assert tree(tmp_path) == before
    assert store.experts == []


def test_name_differing_only_in_case(store: DeltaStore) -> None:
    add(store, "math")
    with pytest.raises(InvalidNameError, match="case"):
        add(store, "Math")


def test_existing_name_and_overwrite(store: DeltaStore) -> None:
    add(store, "math", seed=1)
    with pytest.raises(ExpertExistsError, match="overwrite=True"):
        add(store, "math", seed=2)
    new = add(store, "math", seed=2, overwrite=True)
    got, entry = store.load_expert("math")
    assert_layers_equal(got, new)
    assert entry["meta"]["seed"] == 2 and store.experts == ["math"]


def test_unknown_expert_lists_available(store: DeltaStore) -> None:
    add(store, "math")
    add(store, "chat")
    with pytest.raises(UnknownExpertError, match="'chat', 'math'"):
        store.load_expert("code")
    with pytest.raises(UnknownExpertError):
        store.expert_meta("code")


@pytest.mark.parametrize(
    ("layers", "meta", "error"),
    [
        ({"l": {"w": [1.0, 2.0]}}, {}, InvalidTensorError),
        ({"l": {"a::b": torch.ones(2)}}, {}, InvalidEntryError),
        ({"l:": {"w": torch.ones(2)}}, {}, InvalidEntryError),
        ({"l": {}}, {}, InvalidEntryError),
        ({"l": {"w": torch.ones(2)}}, {"other": {}}, InvalidEntryError),
        ({"l": {"w": torch.ones(2)}}, {"l": {"bytes": 3}}, InvalidEntryError),
        ({"l": {"w": torch.ones(2)}}, {"l": {"x": object()}}, InvalidEntryError),
    ],
)
def test_bad_inputs_rejected_before_writing(tmp_path: Path, store: DeltaStore, layers, meta, error) -> None:
    before = tree(tmp_path)
    with pytest.raises(error):
        store.add_expert("e", layers, meta, {})
    assert tree(tmp_path) == before


def test_extra_must_be_json(store: DeltaStore) -> None:
    with pytest.raises(InvalidEntryError, match="router"):
        store.set_extra("router", {"centroids": torch.ones(2)})
    store.set_extra("router", {"kind": "knn"})
    store.set_extra("router", {"kind": "centroid"})
    assert store.extra == {"router": {"kind": "centroid"}}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_tensors(store: DeltaStore) -> None:
    with pytest.raises(InvalidTensorError, match="cuda"):
        store.add_expert("e", {"l": {"w": torch.ones(2, device="cuda")}}, {}, {})
    state = {"w": torch.randn(3, 3)}
    assert fingerprint_state_dict(state) == fingerprint_state_dict({"w": state["w"].cuda()})


def test_shared_and_strided_tensors(store: DeltaStore) -> None:
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    layers = {"l": {"w": w, "wt": w.t(), "same": w, "scalar": torch.tensor(7, dtype=torch.int64)}}
    store.add_expert("e", layers, {}, {})
    assert_layers_equal(store.load_expert("e")[0], layers)


def test_errors_are_typed() -> None:
    for cls in (StoreNotFoundError, CorruptStoreError, StoreVersionError, BaseMismatchError, InvalidNameError,
                ExpertExistsError, UnknownExpertError, InvalidEntryError, InvalidTensorError):
        assert issubclass(cls, StoreError) and issubclass(cls, MeswitchError)


# ---- crashes and concurrency ---------------------------------------------------------------------

CRASH = textwrap.dedent(
    """
    import os, sys
    import torch
    from meswitch.store import DeltaStore

    store = DeltaStore.open(sys.argv[1])
    real_replace = os.replace

    def crash(src, dst, *args, **kwargs):  # the process dies right after the temporary file is written
        if str(dst).endswith(".safetensors"):
            os._exit(3)
        return real_replace(src, dst, *args, **kwargs)

    os.replace = crash
    store.add_expert("new", {"l": {"w": torch.ones(4)}}, {}, {})
    """
)


def test_crash_mid_write_leaves_store_intact(store: DeltaStore) -> None:
    old = add(store, "math", seed=1)
    proc = subprocess.run([sys.executable, "-c", CRASH, str(store.path)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    experts_dir = store.path / "experts"
    assert [p for p in experts_dir.iterdir() if p.name.startswith(".tmp-")], "expected a leftover temporary"

    again = DeltaStore.open(store.path)
    assert again.experts == ["math"]
    assert_layers_equal(again.load_expert("math")[0], old)
    again.verify()

    (experts_dir / "orphan.safetensors").write_bytes(b"renamed but never entered in the manifest")
    new = add(again, "new", seed=2)
    assert sorted(p.name for p in experts_dir.iterdir()) == ["math.safetensors", "new.safetensors"]
    assert_layers_equal(again.load_expert("new")[0], new)


def test_failed_rename_keeps_old_state(store: DeltaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    old = add(store, "math", seed=1)

    def fail(src, dst, *args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(store_module.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        add(store, "chat", seed=2)
    with pytest.raises(OSError, match="simulated"):
        add(store, "math", seed=3, overwrite=True)
    monkeypatch.undo()
    assert store.experts == ["math"]
    assert_layers_equal(store.load_expert("math")[0], old)
    assert sorted(p.name for p in (store.path / "experts").iterdir()) == ["math.safetensors"]


def test_concurrent_adds_all_land(store: DeltaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = store_module.atomic_write_json
    gate = threading.Barrier(2)

    def slow_write(path, obj):  # widen the read-modify-write window so a missing lock would lose updates
        threading.Event().wait(0.02)
        real_write(path, obj)

    monkeypatch.setattr(store_module, "atomic_write_json", slow_write)
    errors: list[BaseException] = []

    def worker(prefix: str) -> None:
        own = DeltaStore.open(store.path)
        gate.wait()
        try:
            for i in range(4):
                own.add_expert(f"{prefix}{i}", {"l": {"w": torch.full((4,), float(i))}}, {}, {"i": i})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.experts == [f"{p}{i}" for p in "ab" for i in range(4)]
    store.verify()


# ---- fingerprint ---------------------------------------------------------------------------------

def test_fingerprint_tracks_values_names_shapes() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(3, generator=g).half()}
    fp = fingerprint_state_dict(state)
    assert fp == fingerprint_state_dict({k: v.clone() for k, v in reversed(state.items())})
    changed = {k: v.clone() for k, v in state.items()}
    changed["a.weight"][2, 1] += 1e-3
    renamed = {"a.weight2": state["a.weight"], "b.bias": state["b.bias"]}
    reshaped = {"a.weight": state["a.weight"].reshape(3, 4), "b.bias": state["b.bias"]}
    recast = {"a.weight": state["a.weight"], "b.bias": state["b.bias"].bfloat16()}
    fps = {fingerprint_state_dict(s) for s in (changed, renamed, reshaped, recast)}
    assert len(fps) == 4 and fp not in fps


def test_fingerprint_model_and_base_info(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    untied = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    untied.load_state_dict({k: v.clone() for k, v in tied.state_dict().items()})
    assert fingerprint_model(tied) == fingerprint_model(untied) == fingerprint_state_dict(tied.state_dict())
    assert fingerprint_model(tied) == fingerprint_model(tied)

    assert base_info(tied) == {"architecture": "Sequential", "model_type": None, "hidden_size": None,
                               "num_hidden_layers": None, "vocab_size": None, "num_parameters": 40}
    tied.config = SimpleNamespace(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4,
                                  num_hidden_layers=1, vocab_size=10)
    info = base_info(tied)
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == 10
    store = DeltaStore.create(tmp_path / "s", fingerprint_model(tied), info)
    assert store.base["model_type"] == "llama"
