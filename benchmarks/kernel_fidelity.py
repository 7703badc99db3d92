"""What the CPU delta kernels cost in fidelity, on the full zoo's store and its experts' own text.

The engine's ``reference`` delta backend (``x @ dequantize()^T`` per expert, float32 arithmetic) is
the exact path. The kernel backends round the activations of the delta term: ``int4`` to bf16
(PyTorch's int4 weight-only kernel), ``lowbit`` to int8 per row and per 64 columns (meswitch's
low-bit kernel, ``engine/kernels/lowbit_cpu.py``). For each expert, a few held-out examples of its domain are run
teacher-forced through the engine as one mixed batch (every expert's rows in every step, no merged
weights), and each position's next-token distribution is compared with the exact path's: mean
KL(exact || kernel), top-1 agreement and the largest logit difference.

    python benchmarks/kernel_fidelity.py [--store DIR] [--examples 4] [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402

EXACT = "reference"
KERNELS = ("int4", "lowbit")  # delta backends compared with EXACT (the JSON keeps them under "caches")


def teacher_forced(engine, seqs: dict[str, list[int]], prefill: int):
    """``{expert: float32 [len - prefill + 1, V]}``: logits after a mixed prefill, then one token per step."""
    import torch

    from meswitch.engine.model import SeqSlice, StepBatch

    names = list(seqs)
    idx = {n: engine.pool.lookup(n) for n in names}
    for n in names:
        engine.pool.acquire(idx[n])
    length = min(len(s) for s in seqs.values())
    cache = engine.model.new_cache(len(names), length + 1)
    out: dict[str, list] = {n: [] for n in names}
    with torch.no_grad():
        step = [SeqSlice(i, 0, prefill, idx[n]) for i, n in enumerate(names)]
        logits = engine.model(torch.tensor([t for n in names for t in seqs[n][:prefill]]), StepBatch.build(step), cache)
        for i, n in enumerate(names):
            out[n].append(logits[i].float())
        for pos in range(prefill, length):
            step = [SeqSlice(i, pos, 1, idx[n]) for i, n in enumerate(names)]
            logits = engine.model(torch.tensor([seqs[n][pos] for n in names]), StepBatch.build(step), cache)
            for i, n in enumerate(names):
                out[n].append(logits[i].float())
    for n in names:
        engine.pool.release(idx[n])
    return {n: torch.stack(v) for n, v in out.items()}


def compare(ref, got) -> dict:
    """Mean KL(ref || got), top-1 agreement, largest |logit difference| over positions ``[P, V]``."""
    import torch.nn.functional as F

    lp, lq = F.log_softmax(ref.double(), -1), F.log_softmax(got.double(), -1)  # float64: KLs near 1e-8 stay >= 0
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return {"kl": float(kl.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).float().mean()),
            "max_abs_logit": float((ref - got).abs().max()), "positions": ref.shape[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/meswitch/stores/full")
    ap.add_argument("--examples", type=int, default=4, help="held-out examples per expert")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per example (the first 8 are prefilled)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from meswitch.data.chat import render
    from meswitch.data.examples import read_jsonl
    from meswitch.engine import Engine, EngineConfig
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore
    from meswitch.zoo.build import ZooPaths, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    torch.set_num_threads(2)
    store = DeltaStore.open(args.store)
    base, tok = load_checkpoint(Path(store.extra["base_path"]))
    domains = dict(get_recipe("full").experts)
    paths = ZooPaths(zoo_dir("full"))
    texts = {n: [render(e, tok)[0][: args.tokens] for e in read_jsonl(paths.split(domains[n], "test"))[: args.examples]]
             for n in store.experts if n in domains}
    engines = {c: Engine(store, base, tok, EngineConfig(max_merged=0, backend=c), check_base=False)
               for c in (EXACT, *KERNELS)}
    kernels = []
    for c in KERNELS:  # a backend that cannot run here falls back: then it is not the one measured
        selection = engines[c].backend_selection
        if selection.backend.name == c:
            kernels.append(c)
        else:
            print(f"skipping {c}: {selection.describe()}", file=sys.stderr)
    rows: dict[str, dict[str, list[dict]]] = {c: {n: [] for n in texts} for c in kernels}
    for j in tqdm(range(args.examples), desc="examples (each: every expert in one batch, every path)"):
        seqs = {n: v[j] for n, v in texts.items() if j < len(v)}
        ref = teacher_forced(engines[EXACT], seqs, 8)
        for c in kernels:
            got = teacher_forced(engines[c], seqs, 8)
            for n in seqs:
                rows[c][n].append(compare(ref[n], got[n]))
    summary = {c: {n: {k: sum(r[k] for r in rs) / len(rs) for k in ("kl", "top1", "max_abs_logit")}
                   | {"positions": sum(r["positions"] for r in rs)} for n, rs in by.items()} for c, by in rows.items()}
    result = {"machine": machine(), "store": str(args.store), "examples": args.examples, "tokens": args.tokens,
              "reference": f"backend={EXACT!r}: x @ dequantize()^T, float32",
              "backends": {c: engines[c].backend_selection.describe() for c in engines}, "caches": summary}
    (results_dir() / "kernel_fidelity.json").write_text(json.dumps(result, indent=2))
    print("| kernel | expert | positions | mean KL to the exact path | top-1 agreement | max abs logit diff |\n"
          "|---|---|---|---|---|---|")
    for c, by in summary.items():
        for n, s in by.items():
            print(f"| {c} | {n} | {s['positions']} | {s['kl']:.2e} | {s['top1']:.4f} | {s['max_abs_logit']:.3f} |")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
