"""LoRA adapters as experts: the stored record, its form in every backend, PEFT adapter directories read
against the base, and the engine serving them next to quantized experts as PEFT's own model computes them."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the Triton kernel module is first imported

from meswitch.cli import main
from meswitch.compress.config import CompressConfig
from meswitch.data.examples import Example, read_jsonl, write_jsonl
from meswitch.deltas import DeltaFormatError, LowRankDelta, decode, decode_delta
from meswitch.deltas.apply import apply_delta
from meswitch.engine import Engine, EngineConfig, Request, SamplingParams, backends
from meswitch.engine.backends.forms import LowRankForm
from meswitch.engine.kernels import lora_cpu, sgmv_triton
from meswitch.engine.segments import Segments
from meswitch.errors import MeswitchError
from meswitch.jobs.compress_store import compress_into_store
from meswitch.jobs.peft_adapter import AdapterError, read_adapter
from meswitch.jobs.store_fidelity import merge_adapter, store_fidelity
from meswitch.model.checkpoint import save_checkpoint
from meswitch.store import DeltaStore
from meswitch.store.summary import summarize
from tests.delta_helpers import IN, OUT, encoded, gen, rel_close
from tests.engine_helpers import hf_logits, make_store, perturbed, teacher_forced_logits, tiny_base

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"reference": 1e-5, "pytorch": 1e-4, "dense": 1e-4, "int4": 2e-2, "lowbit": 3e-2, "triton": 1e-4}


def low_rank(seed: int, r: int = 4, out: int = OUT, n: int = IN, dtype=torch.float16, scale: float = 2.0):
    g = gen(seed)
    return LowRankDelta((torch.randn(r, n, generator=g) * 0.1).to(dtype),
                        (torch.randn(out, r, generator=g) * 0.1).to(dtype), scale)


# ---- the record ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_lora_record_is_scale_b_a_and_writing_gives_the_same_tensors_back(dtype):
    record = low_rank(1, dtype=dtype, scale=0.75)
    fields, meta = record.fields(), record.meta()
    assert meta == {"method": "lora", "bits": 16, "shape": [OUT, IN], "salient": 0, "rank": 4, "scale": 0.75}
    assert fields["lora_a"].dtype == dtype and list(fields["lora_b"].shape) == [OUT, 4]
    back = decode(fields, json.loads(json.dumps(meta)))  # as the manifest keeps it
    assert isinstance(back, LowRankDelta) and back.shape == (OUT, IN) and back.rank == 4
    by_hand = 0.75 * fields["lora_b"].double() @ fields["lora_a"].double()
    torch.testing.assert_close(back.dequantize().double(), by_hand, rtol=1e-6, atol=1e-9)
    for name, t in back.fields().items():
        assert torch.equal(t, fields[name]) and t.dtype == fields[name].dtype, name


def test_float32_factors_are_stored_as_fp16():
    record = low_rank(2, dtype=torch.float32)
    assert {t.dtype for t in record.fields().values()} == {torch.float16}


def test_a_stored_lora_delta_applies_to_its_weight():
    model = torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))
    w0 = model[0].weight.detach().clone()
    record = low_rank(3)
    apply_delta(model, {"0": record.fields()}, {"0": record.meta()})  # keyed by the linear layer's module name
    torch.testing.assert_close(model[0].weight.detach(), w0 + record.dequantize())


@pytest.mark.parametrize(("change", "message"), [
    (lambda f, m: f.pop("lora_b"), r"lacks stored field\(s\) \['lora_b'\]"),
    (lambda f, m: f.update(lora_a=f["lora_a"][:, :-1]), r"lora_a must be \[4, 80\], got \[4, 79\]"),
    (lambda f, m: f.update(lora_b=f["lora_b"][:-1]), r"lora_b must be \[48, 4\], got \[47, 4\]"),
    (lambda f, m: m.update(rank=3), r"rank 3: lora_a must be \[3, 80\]"),
    (lambda f, m: m.pop("rank"), "positive integer rank"),
    (lambda f, m: m.update(scale="2"), "finite number scale"),
    (lambda f, m: m.update(scale=float("nan")), "finite number scale"),
    (lambda f, m: m.update(shape=[OUT, IN, 1]), r"must be \[out, in\]"),
    (lambda f, m: f.update(lora_a=f["lora_a"].to(torch.int16)), "must be floating point"),
])
def test_bad_lora_fields_are_refused_naming_the_field(change, message):
    record = low_rank(4)
    fields, meta = record.fields(), record.meta()
    change(fields, meta)
    with pytest.raises(DeltaFormatError, match=message):
        decode(fields, meta)


def test_mismatched_factors_are_refused_by_the_record():
    with pytest.raises(DeltaFormatError, match=r"a is \[4, 80\] and b \[48, 3\]"):
        LowRankDelta(torch.zeros(4, IN), torch.zeros(OUT, 3), 1.0)


# ---- the form, in every backend -----------------------------------------------------------------------------


def _backend_cases() -> list:
    cases = []
    for name in backends.BACKENDS:
        if name == "triton":
            cases.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
                not sgmv_triton.available(), reason="triton is not installed")))
        else:
            cases.append(pytest.param(name, id=name))
    return cases


def make_backend(name: str) -> backends.DeltaBackend:
    if name == "triton":
        return backends.backend_class(name)(DEVICE)  # on a CPU: Triton's interpreter, as tests/test_backends.py
    try:
        return backends.create(name, "cpu")
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", _backend_cases())
def test_every_backend_holds_lora_factors_as_a_low_rank_form_that_gives_the_delta_back(name):
    record = low_rank(5, r=6)
    form = make_backend(name).prepare(decode(record.fields(), record.meta()))
    assert isinstance(form, LowRankForm) and tuple(form.shape) == (OUT, IN)
    assert torch.equal(form.dequantize().cpu(), record.dequantize())  # merged weights are built from it
    assert form.nbytes() == 2 * (6 * IN + OUT * 6)  # the two factors in their stored 16 bits, nothing else
    assert form.delta.a.dtype == form.delta.b.dtype == torch.float16
    x = torch.randn(5, IN, generator=gen(6))
    rel_close(form.matmul(x.to(form.delta.a.device)).cpu(), x @ record.dequantize().T, 1e-5)


@pytest.mark.parametrize("name", _backend_cases())
def test_a_mixed_add_of_lora_and_quantized_experts_matches_each_delta_on_its_rows(name):
    """Experts 0 and 2 are LoRA, 1 and 3 quantized; two layers of one input on columns [0, 48) and [48, 80)."""
    backend = make_backend(name)
    ids = [-1] * 2 + [0] * 3 + [1] * 5 + [2] * 1 + [3] * 4
    seg = Segments.from_ids(ids)
    x = torch.randn(len(ids), IN, generator=gen(7))
    widths = (OUT, 32)
    y0 = torch.randn(len(ids), sum(widths), generator=gen(8))
    y, want = y0.clone().to(DEVICE), y0.clone()
    work, col = [], 0
    for j, w in enumerate(widths):
        for e, s, t in seg:
            if e < 0:
                continue
            if e % 2 == 0:
                record = low_rank(10 * j + e, r=2 + e, out=w)
                stored = record.fields(), record.meta()
            else:
                stored = encoded(("salient", 2, 7, True) if e == 1 else ("rtn", 3, 0, False), 10 * j + e, out=w)
            work.append((backend.prepare(decode(*stored)), s, t, col))
            want[s:t, col : col + w] += x[s:t] @ decode_delta(*stored).T
        col += w
    backend.add(x.to(DEVICE), y, work, {})
    got = y.cpu()
    lora_rows = [i for i, e in enumerate(ids) if e in (0, 2)]
    rel_close(got[lora_rows] - y0[lora_rows], want[lora_rows] - y0[lora_rows], 1e-5)  # float32 in every backend
    rel_close(got - y0, want - y0, TOL[name])
    assert torch.equal(got[:2], y0[:2])  # base rows untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_lora_kernel_adds_every_item_from_the_16_bit_factors(dtype):
    """Ranks 16, 5 and 8 (whole and partial vector blocks), odd widths, rows of several items, a column slice."""
    if not lora_cpu.available():
        pytest.skip(f"no LoRA CPU kernel: {lora_cpu.unavailable_reason()}")
    g = gen(20)
    x = torch.randn(12, 77, generator=g)
    y0 = torch.randn(12, 60, generator=g)
    items = []
    for r, out, s, t, c in ((16, 40, 0, 5, 3), (5, 13, 5, 6, 1), (8, 17, 6, 12, 43), (16, 16, 0, 5, 44)):
        a, b = (torch.randn(r, 77, generator=g) * 0.1).to(dtype), (torch.randn(out, r, generator=g) * 0.1).to(dtype)
        items.append((a, b, 0.5 + r / 8, s, t, c))
    y = y0.clone()
    lora_cpu.sgmv(x, y[:, 1:], [(a, b, sc, s, t, c - 1) for a, b, sc, s, t, c in items])  # a column slice of y
    want = y0.double()
    for a, b, sc, s, t, c in items:  # float64 products of the 16-bit values
        want[s:t, c : c + b.shape[0]] += sc * (x[s:t].double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)


# ---- PEFT adapters, compressed and served -------------------------------------------------------------------


def _random_fp16_values(model) -> None:
    """Random LoRA factors (lora_B starts at zero) and saved copies, in values fp16 holds exactly, so
    storing them in 16 bit is lossless and the engine can be compared with PEFT at float32 precision."""
    g = gen(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).half().float())
            elif "modules_to_save" in n:
                p.copy_((p + torch.randn(p.shape, generator=g) * 0.1).half().float())


def peft_adapter(base, out: Path, **config):
    """PEFT's model of ``base`` with a random LoRA adapter of ``config``, saved to ``out`` by PEFT."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    _random_fp16_values(model)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, smollm_tokenizer):
    """A saved tiny base and a store beside it with one 2-bit quantized expert, ``quant``."""
    root = tmp_path_factory.mktemp("lora")
    base = tiny_base()
    save_checkpoint(base, smollm_tokenizer, root / "base", {"role": "base"})
    make_store(root / "store", base, {"quant": perturbed(base, 1)}, method="salient", bits=2, k=8)
    return root, base


@pytest.fixture(scope="module")
def served(saved):
    """The store with two PEFT adapters compressed into it: ``lora`` (r=4 on q, v, down) and ``rs`` (rsLoRA,
    rank and alpha patterns, the final norm trained whole)."""
    root, base = saved
    models = {
        "lora": peft_adapter(base, root / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rs": peft_adapter(base, root / "rs", r=8, lora_alpha=16, use_rslora=True, rank_pattern={"up_proj": 2},
                           alpha_pattern={"gate_proj": 4}, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                           modules_to_save=["model.norm"]),
    }
    info = compress_into_store(root / "base", {"lora": root / "lora", "rs": root / "rs"}, root / "store", None,
                               CompressConfig())
    return root, base, models, info


def test_adapters_are_stored_as_their_factors_with_peft_scales(served):
    root, base, _, info = served
    store = DeltaStore.open(root / "store")
    assert store.experts == ["lora", "quant", "rs"]
    assert store.extra["base_path"] == str((root / "base").resolve())
    layers = store.expert_meta("rs")["layers"]
    assert layers["model.layers.0.self_attn.k_proj"]["scale"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA
    assert layers["model.layers.1.mlp.up_proj"]["rank"] == 2  # rank_pattern
    assert layers["model.layers.1.mlp.gate_proj"]["scale"] == pytest.approx(4 / 8 ** 0.5)  # alpha_pattern
    assert layers["model.norm.weight"]["method"] == "dense"  # modules_to_save: a dense delta against the base
    lora = store.expert_meta("lora")
    assert {m["method"] for m in lora["layers"].values()} == {"lora"} and len(lora["layers"]) == 2 * 3
    assert {m["scale"] for m in lora["layers"].values()} == {2.0}
    assert info["lora"]["rounding_16bit"] == 0.0 and info["lora"]["warnings"] == []
    factor_bytes = sum(m["bytes"] for m in lora["layers"].values())
    linear = sum(p.numel() for n, p in base.named_parameters() if ".layers." in n and "proj" in n)
    assert info["lora"]["bits_per_param"] == pytest.approx(8 * factor_bytes / linear)
    s = summarize(root / "store")["experts"]
    assert s["lora"]["kind"] == "lora" and s["lora"]["rank"] == 4 and s["lora"]["method"] == "lora"
    assert s["quant"]["kind"] == "compressed"


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_lora_experts_match_peft_in_a_mixed_batch_with_a_quantized_expert(served, smollm_tokenizer, backend):
    root, base, models, _ = served
    store = DeltaStore.open(root / "store")
    eng = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig(backend=backend))
    g = torch.Generator().manual_seed(3)
    seqs = {n: torch.randint(0, 49152, (10,), generator=g).tolist() for n in ["lora", "base", "quant", "rs"]}
    got = teacher_forced_logits(eng, seqs, prefill=4)
    for name in ("lora", "rs"):
        want = hf_logits(models[name], seqs[name], 4)
        torch.testing.assert_close(got[name], want, atol=1e-4, rtol=0, msg=f"expert {name}")
        assert (want - hf_logits(base, seqs[name], 4)).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(got["base"], hf_logits(base, seqs["base"], 4), atol=1e-4, rtol=0)
    layers, entry = store.load_expert("quant")
    quant = apply_delta(copy.deepcopy(base), layers, entry["layers"])
    torch.testing.assert_close(got["quant"], hf_logits(quant, seqs["quant"], 4), atol=2e-2, rtol=0)


def test_mixed_batch_greedy_equals_each_request_alone(served, smollm_tokenizer):
    root, base, _, _ = served
    store = DeltaStore.open(root / "store")
    prompts = ["Hello there, how are", "def add(a, b):", "What is 7 times 6?", "The weather today"]
    experts, lengths = ["lora", None, "quant", "rs", "lora"], [8, 3, 6, 5, 2]
    reqs = [Request(prompt=prompts[i % 4], expert=e, params=SamplingParams(max_tokens=n, temperature=0,
                                                                           ignore_eos=True))
            for i, (e, n) in enumerate(zip(experts, lengths, strict=True))]
    together = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig()).generate(reqs)
    alone_engine = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig())
    for r, got in zip(reqs, together, strict=True):
        alone = alone_engine.generate([Request(prompt=r.prompt, expert=r.expert, params=r.params)])[0]
        assert got.token_ids == alone.token_ids, r.expert
    base_alone = alone_engine.generate([Request(prompt=prompts[0], params=reqs[0].params)])[0]
    assert together[0].token_ids != base_alone.token_ids  # the LoRA expert answers differently


def adapter_bytes(adapter: Path) -> tuple[int, int]:
    """(bytes of the adapter's LoRA factors in 16 bit, float32 bytes of its other tensors), read from its
    ``adapter_model.safetensors`` (header and all) by hand, not by meswitch."""
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    sizes = {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    factors = sum(2 * n for k, n in sizes.items() if ".lora_A." in k or ".lora_B." in k)
    return factors, sum(4 * n for k, n in sizes.items() if ".lora_" not in k)


@pytest.mark.parametrize("backend", ["reference", "pytorch", "auto"])
def test_a_resident_lora_expert_holds_its_stored_factors_and_nothing_else(served, smollm_tokenizer, backend):
    root, base, _, _ = served
    store = DeltaStore.open(root / "store")
    eng = Engine(store, copy.deepcopy(base), smollm_tokenizer, EngineConfig(backend=backend))
    eng.pool.pin("lora")
    eng.pool.pin("rs")
    snap = eng.pool.snapshot()
    for name in ("lora", "rs"):
        factors, others = adapter_bytes(root / name)  # the adapter's fp32 factors, stored in 16 bit
        assert others == (4 * 64 if name == "rs" else 0)  # the final norm (modules_to_save), held in float32
        assert snap["experts"][name]["resident_bytes"] == factors + others, name
        assert factors == sum(m["bytes"] for m in store.expert_meta(name)["layers"].values() if m["method"] == "lora")
    assert snap["resident_bytes"] == sum(sum(adapter_bytes(root / n)) for n in ("lora", "rs"))


# ---- fidelity against the adapter ---------------------------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b",
         "What is 7 times 6? It is 42.", "Rain is expected over the weekend in the north."]


@pytest.fixture
def held_out(tmp_path) -> Path:
    path = tmp_path / "held-out.jsonl"
    write_jsonl(path, [Example(text=t, domain="any", response="Yes.") for t in TEXTS])
    return path


def test_the_merged_adapter_reference_equals_peft(served):
    root, base, models, _ = served
    ids = torch.randint(0, 49152, (12,), generator=gen(30)).tolist()
    for name in ("lora", "rs"):
        merged = merge_adapter(copy.deepcopy(base), root / name)
        torch.testing.assert_close(hf_logits(merged, ids, 4), hf_logits(models[name], ids, 4), atol=1e-4, rtol=0)


def test_eval_fidelity_of_a_lora_expert_is_exact_against_its_own_adapter(served, held_out, capsys):
    root = served[0]
    for name in ("lora", "rs"):
        assert main(["eval", "fidelity", str(root / "store"), "--expert", name, "--text", str(held_out), "--json"]) == 0
        fid = json.loads(capsys.readouterr().out)
        assert fid["tokens"] >= 12 and fid["top1"] == 1.0, name
        assert abs(fid["kl"]) < 1e-6 and fid["ppl_ratio"] == pytest.approx(1.0, abs=1e-5), name


def test_eval_fidelity_detects_the_wrong_adapter_and_names_a_missing_one(served, held_out, tmp_path, capsys):
    root = served[0]
    examples = read_jsonl(held_out)
    wrong = store_fidelity(root / "store", "lora", examples, reference_dir=root / "rs")
    assert wrong["kl"] > 1e-3 and wrong["top1"] < 1.0
    gone = tmp_path / "gone"
    shutil.copytree(root / "lora", gone)
    compress_into_store(root / "base", {"gone": gone}, tmp_path / "store", None, CompressConfig())
    shutil.rmtree(gone)
    assert main(["eval", "fidelity", str(tmp_path / "store"), "--expert", "gone", "--text", str(held_out)]) == 2
    err = capsys.readouterr().err
    assert f"stored from the LoRA adapter {gone.resolve()}, which is gone" in err and "--reference" in err
    again = store_fidelity(tmp_path / "store", "gone", examples, reference_dir=root / "lora")  # named by hand
    assert again["top1"] == 1.0


# ---- adapters that cannot be stored -------------------------------------------------------------------------

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def write_adapter(path: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """An adapter directory as PEFT writes it: q_proj of block 0 at rank 4 unless ``tensors`` says otherwise."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": False,
           "base_model_name_or_path": None, **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {f"{Q}.lora_A.weight": torch.randn(4, 64), f"{Q}.lora_B.weight": torch.randn(64, 4)}
    save_file(tensors, path / "adapter_model.safetensors")
    return path


BAD = {
    "not-lora": ({"peft_type": "PREFIX_TUNING"}, None, "peft_type is 'PREFIX_TUNING'"),
    "dora": ({"use_dora": True}, None, "use_dora is true"),
    "embedding": ({}, {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 49152),
                       "base_model.model.model.embed_tokens.lora_embedding_B": torch.zeros(64, 4)},
                  "LoRA on an embedding is not supported"),
    "lm-head": ({}, {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                     "base_model.model.lm_head.lora_B.weight": torch.zeros(49152, 4)}, "outside the decoder blocks"),
    "other-base": ({}, {f"{Q}.lora_A.weight": torch.zeros(4, 96), f"{Q}.lora_B.weight": torch.zeros(64, 4)},
                   r"lora_A is \[4, 96\] and lora_B \[64, 4\], but the base weight is \[64, 64\]"),
    "no-module": ({}, {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
                       "base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)},
                  "the base has no such module"),
    "unpaired": ({}, {f"{Q}.lora_A.weight": torch.zeros(4, 64)}, "has lora_A without its pair"),
    "rank": ({"r": 8}, None, "lora_A has rank 4, but adapter_config.json gives r=8"),
    "two-adapters": ({}, {f"{Q}.lora_A.a.weight": torch.zeros(4, 64), f"{Q}.lora_B.a.weight": torch.zeros(64, 4),
                          "base_model.model.model.layers.1.self_attn.q_proj.lora_A.b.weight": torch.zeros(4, 64),
                          "base_model.model.model.layers.1.self_attn.q_proj.lora_B.b.weight": torch.zeros(64, 4)},
                     r"several adapters \['a', 'b'\]"),
    "saved-copy": ({"modules_to_save": ["model.norm"]}, {"base_model.model.model.norm.weight": torch.ones(32)},
                   r"'model.norm.weight' \(modules_to_save\) is \[32\], the base's \[64\]"),
    "tied-head": ({"modules_to_save": ["lm_head"]}, {"base_model.model.lm_head.weight": torch.ones(49152, 64)},
                  "ties its embeddings and output head"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_adapter_meswitch_cannot_serve_is_refused_and_nothing_is_written(saved, tmp_path, case):
    root = saved[0]
    config, tensors, message = BAD[case]
    good = write_adapter(tmp_path / "good")
    bad = write_adapter(tmp_path / "adapter", tensors, **config)
    before = (root / "store" / "manifest.json").read_bytes()
    with pytest.raises(AdapterError, match=message) as err:
        compress_into_store(root / "base", {"good": good, "bad": bad}, root / "store", None, CompressConfig())
    assert str(bad) in str(err.value)  # names the file
    assert (root / "store" / "manifest.json").read_bytes() == before  # the good adapter was not stored either
    with pytest.raises(AdapterError, match=message):
        compress_into_store(root / "base", {"bad": bad}, tmp_path / "new", None, CompressConfig())
    assert not (tmp_path / "new").exists()


def test_missing_files_are_named_with_a_hint_for_pickles(saved, tmp_path):
    root = saved[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeswitchError, match="has no config.json .* and no adapter_config.json"):
        compress_into_store(root / "base", {"bad": tmp_path / "empty"}, tmp_path / "new", None, CompressConfig())
    bad = write_adapter(tmp_path / "adapter")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors: missing$"):
        compress_into_store(root / "base", {"bad": bad}, tmp_path / "new", None, CompressConfig())
    (bad / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="is a pickle"):
        compress_into_store(root / "base", {"bad": bad}, tmp_path / "new", None, CompressConfig())
    assert not (tmp_path / "new").exists()


def test_an_adapter_trained_on_another_named_base_is_stored_with_a_warning(saved, tmp_path, caplog):
    root, base = saved
    named = write_adapter(tmp_path / "adapter", base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    layers, meta, info = read_adapter(named, base, root / "base")
    assert "trained on 'meta-llama/Llama-2-7b-hf'" in info["warnings"][0]
    assert "meta-llama/Llama-2-7b-hf" in caplog.text
    same = write_adapter(tmp_path / "same", base_model_name_or_path="/elsewhere/base")  # same name, another path
    assert read_adapter(same, base, root / "base")[2]["warnings"] == []


def test_compress_and_inspect_commands_show_a_lora_expert(saved, tmp_path, capsys):
    root = saved[0]
    out = tmp_path / "store"
    adapter = write_adapter(tmp_path / "chat")
    assert main(["compress", "--base", str(root / "base"), "--expert", f"chat={adapter}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lora r=4" in printed and "chat" in printed
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["experts"]["chat"]["kind"] == "lora" and summary["experts"]["chat"]["bits"] == 16
    bad = write_adapter(tmp_path / "dora", use_dora=True)
    assert main(["compress", "--base", str(root / "base"), "--expert", f"d={bad}", "--out", str(out)]) == 2
    assert "use_dora is true" in capsys.readouterr().err
    assert DeltaStore.open(out).experts == ["chat"]
