"""The GGUF-exact base kernels against the fp32 base: every linear of SmolLM2-135M from its Q4_1 / Q8_0
blocks (``ggml_cpu.linear``) and from the dequantized fp32 weight (``F.linear``, what the engine runs today).

Each linear of a decoder block (q, k, v, o, gate, up, down) is timed as a sweep over all 30 layers'
tensors of that role, so that the weights come from memory as in a decode step (the fp32 base is
538 MB, far above the L3 cache) rather than from a cache warmed by the previous call; the head
(``token_embd``, Q8_0, tied) is one tensor. The fp32 and the kernel sweeps alternate within one
process, ``--repeats`` times each, and the medians are reported. The whole-model line adds the
per-layer medians over 30 blocks and the head: the linear layers of one decode step, nothing else.

    python benchmarks/ggml_kernels.py [--batches 1 8 16] [--threads 1 2] [--repeats 7]

Writes docs/results/ggml_kernels.md and docs/results/ggml_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402

ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LAYERS = 30


def timed(fn) -> float:
    """One call's wall time in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure(weights: list, blocks: list, x, repeats: int) -> tuple[float, float]:
    """Median ms of one sweep of ``F.linear(x, w)`` over ``weights`` and of ``ggml_cpu.linear`` over ``blocks``,
    alternating."""
    import torch.nn.functional as F

    from meswitch.engine.kernels import ggml_cpu

    def fp32() -> None:
        for w in weights:
            F.linear(x, w)

    def ggml() -> None:
        for t in blocks:
            ggml_cpu.linear(x, t.blocks, t.type, t.shape[0])

    fp32(), ggml()  # warm-up: first-call allocations, thread pool
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(fp32))
        b.append(timed(ggml))
    return statistics.median(a), statistics.median(b)


def table(rows: list[dict], threads: int, batches: list[int]) -> str:
    head = "| linear | out x in | type | " + " | ".join(f"batch {b}: fp32 / ggml ms (speed-up)" for b in batches) + " |"
    lines = [f"**{threads} thread{'s' if threads > 1 else ''}**", "", head, "|" + "---|" * (3 + len(batches))]
    for name in [*ROLES, "head", "whole model"]:
        cells = []
        for b in batches:
            r = next(r for r in rows if r["threads"] == threads and r["batch"] == b and r["linear"] == name)
            cells.append(f"{r['fp32_ms']:.3g} / {r['ggml_ms']:.3g} ({r['fp32_ms'] / r['ggml_ms']:.2f}x)")
        r0 = next(r for r in rows if r["linear"] == name)
        lines.append(f"| {name} | {r0['shape']} | {r0['type']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/results as they are")
    args = ap.parse_args(argv)

    import torch

    from meswitch.engine.kernels import ggml_cpu
    from meswitch.model.checkpoint import packaged_gguf_path
    from meswitch.model.gguf_blocks import read_blocks

    isa, why = ggml_cpu.choose()
    if isa is None:
        print(f"the GGML CPU kernel is unavailable: {why}", file=sys.stderr)
        return 1
    blocks = read_blocks(packaged_gguf_path())
    groups = {role: [blocks[f"model.layers.{i}.{mod}.weight"] for i in range(LAYERS)] for role, mod in ROLES.items()}
    groups["head"] = [blocks["lm_head.weight"]]
    dense = {role: [ggml_cpu.dequantize(t.blocks, t.type, t.shape[0]) for t in ts] for role, ts in groups.items()}
    fp32_mb = sum(w.numel() * 4 for ws in dense.values() for w in ws) / 1e6
    ggml_mb = sum(t.nbytes() for ts in groups.values() for t in ts) / 1e6

    rows: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            total = {"fp32_ms": 0.0, "ggml_ms": 0.0}
            for role, ts in groups.items():
                x = torch.randn(batch, ts[0].shape[1])
                a, b = measure(dense[role], ts, x, args.repeats)
                n = len(ts)
                rows.append({"linear": role, "shape": f"{ts[0].shape[0]} x {ts[0].shape[1]}", "type": ts[0].type,
                             "threads": threads, "batch": batch, "fp32_ms": a / n, "ggml_ms": b / n})
                scale = LAYERS if role != "head" else 1
                total["fp32_ms"] += a / n * scale
                total["ggml_ms"] += b / n * scale
            rows.append({"linear": "whole model", "shape": f"{LAYERS} x 7 + head", "type": "Q4_1 + Q8_0",
                         "threads": threads, "batch": batch, **total})
            print(f"threads {threads}, batch {batch}: fp32 {total['fp32_ms']:.1f} ms, ggml {total['ggml_ms']:.1f} ms "
                  f"({total['fp32_ms'] / total['ggml_ms']:.2f}x)", file=sys.stderr)

    load = os.getloadavg()
    md = [f"# GGUF-exact base kernels (benchmarks/ggml_kernels.py, {time.strftime('%Y-%m-%d %H:%M')})", "",
          f"Machine: {machine()}, kernel build `{isa}`, load average {load[0]:.1f} (shared: other jobs ran "
          f"meanwhile). Per-linear ms are the median of {args.repeats} sweeps over the 30 layers' tensors, "
          f"divided by 30; the fp32 weights read per decode step: {fp32_mb:.0f} MB, the GGUF blocks: {ggml_mb:.0f} MB "
          f"({fp32_mb / ggml_mb:.1f}x less).", ""]
    for threads in args.threads:
        md += [table(rows, threads, args.batches), ""]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        out = results_dir()
        (out / "ggml_kernels.md").write_text(text)
        (out / "ggml_kernels.json").write_text(json.dumps(
            {"machine": machine(), "isa": isa, "loadavg": load, "repeats": args.repeats, "fp32_mb": fp32_mb,
             "ggml_mb": ggml_mb, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
