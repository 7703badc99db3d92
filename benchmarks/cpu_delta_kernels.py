"""The CPU delta kernels against each other: meswitch's low-bit VNNI kernel and PyTorch's int4 kernel.

Random codes in one expert's stacked decoder shapes of the full zoo's base (q/k/v, o, gate/up,
down; 30 layers), timed for 1 to 16 rows of one expert, then one decode step's delta work for 3
experts at batch 16 (5, 5 and 6 rows) as the engine runs it: one low-bit call per layer for all
three segments, against one int4 call per expert on rows converted to bf16 once per layer. The
int4 kernel works on 4 rows at a time (5 to 8 rows cost as 8); the low-bit kernel takes any number.
The low-bit kernel's AVX2 build (what CPUs without AVX512-VNNI get) is timed too where it runs.

    python benchmarks/cpu_delta_kernels.py [--threads 2] [--json]

Writes docs/results/cpu_delta_kernels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per call, as the engine stacks them
LAYERS = 30
ROWS = (1, 2, 3, 4, 5, 6, 8, 16)
SEGMENTS = ((0, 5), (5, 10), (10, 16))  # 3 experts at batch 16


def timed(fn, repeats: int = 10) -> float:
    """Best of three means over ``repeats`` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from meswitch.engine import int4, lowbit_cpu

    torch.set_num_threads(args.threads)
    if not lowbit_cpu.available() or not int4.available():
        print(f"needs both kernels: low-bit {lowbit_cpu.unavailable_reason() or 'ok'}, int4 {int4.available()}",
              file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)

    def lowbit_layers(bits: int) -> list[list]:
        return [[lowbit_cpu.build(torch.randint(0, 1 << bits, sh, dtype=torch.uint8, generator=g), torch.arange(sh[1]),
                                  torch.rand(sh[0], generator=g), None, bits, sh) for sh in SHAPES] for _ in range(LAYERS)]

    low = {b: [lowbit_layers(b) for _ in SEGMENTS] for b in (1, 2, 3)}  # per bits: one model's deltas per expert
    i4 = [[[(torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, sh, dtype=torch.int32, generator=g), 2),
             torch.rand(sh[1] // 64, sh[0], 2, generator=g).bfloat16()) for sh in SHAPES] for _ in range(LAYERS)]
          for _ in SEGMENTS]

    avx2 = "avx2" in lowbit_cpu.supported_isas() and lowbit_cpu._build("avx2")[0] is not None
    per_rows: dict[str, dict[str, float]] = {}
    print(f"ms per expert over 30 layers ({lowbit_cpu.isa()} build)\n\n| rows | low-bit 1 bit | 2 bits | 3 bits | "
          "2 bits, AVX2 build | int4 kernel | int4 / low-bit 2 bits |\n|---|---|---|---|---|---|---|")
    for n in ROWS:
        xs = {k: torch.randn(n, k, generator=g) for k in (576, 1536)}
        xb = {k: v.bfloat16() for k, v in xs.items()}
        ys = {o: torch.zeros(n, o) for o, _ in SHAPES}

        def run_low(b: int, isa: str | None = None, xs=xs, ys=ys, n=n):
            for layer in low[b][0]:
                for d, (o, i) in zip(layer, SHAPES, strict=True):
                    lowbit_cpu.sgmv(xs[i], ys[o], [(d, 0, n)], isa=isa)

        def run_i4(xb=xb):
            for layer in i4[0]:
                for (p, sz), (_, i) in zip(layer, SHAPES, strict=True):
                    torch._weight_int4pack_mm_for_cpu(xb[i], p, 64, sz)

        row = {f"lowbit_{b}bit_ms": timed(lambda b=b: run_low(b)) for b in (1, 2, 3)} | {"int4_ms": timed(run_i4)}
        if avx2:
            row["lowbit_2bit_avx2_ms"] = timed(lambda: run_low(2, "avx2"))
        per_rows[str(n)] = row
        print(f"| {n} | {row['lowbit_1bit_ms']:.2f} | {row['lowbit_2bit_ms']:.2f} | {row['lowbit_3bit_ms']:.2f} | "
              f"{row.get('lowbit_2bit_avx2_ms', float('nan')):.2f} | {row['int4_ms']:.2f} | "
              f"{row['int4_ms'] / row['lowbit_2bit_ms']:.2f}x |")

    t = SEGMENTS[-1][1]
    xs = {k: torch.randn(t, k, generator=g) for k in (576, 1536)}
    ys = {o: torch.zeros(t, o) for o, _ in SHAPES}

    def step_low(b: int):
        for layer in range(LAYERS):
            for j, (o, i) in enumerate(SHAPES):
                lowbit_cpu.sgmv(xs[i], ys[o], [(low[b][e][layer][j], s, u) for e, (s, u) in enumerate(SEGMENTS)])

    def step_i4():
        for layer in range(LAYERS):
            for j, (o, i) in enumerate(SHAPES):
                xb = xs[i].bfloat16()
                for e, (s, u) in enumerate(SEGMENTS):
                    p, sz = i4[e][layer][j]
                    ys[o][s:u].add_(torch._weight_int4pack_mm_for_cpu(xb[s:u], p, 64, sz))

    step = {f"lowbit_{b}bit_ms": timed(lambda b=b: step_low(b)) for b in (1, 2, 3)} | {"int4_ms": timed(step_i4)}
    print(f"\none decode step's deltas, 3 experts at batch 16 (rows 5/5/6): low-bit {step['lowbit_1bit_ms']:.1f} / "
          f"{step['lowbit_2bit_ms']:.1f} / {step['lowbit_3bit_ms']:.1f} ms (1/2/3 bits), int4 {step['int4_ms']:.1f} ms "
          f"({step['int4_ms'] / step['lowbit_2bit_ms']:.1f}x the 2-bit time)")
    result = {"machine": machine(), "threads": args.threads, "layers": LAYERS, "shapes": SHAPES, "isa": lowbit_cpu.isa(),
              "per_expert_rows": per_rows, "step_3_experts_batch_16": step}
    (results_dir() / "cpu_delta_kernels.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
