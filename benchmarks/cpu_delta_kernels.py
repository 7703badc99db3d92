"""The CPU delta kernels against each other: meswitch's low-bit kernel and PyTorch's int4 kernel.

Random codes in one expert's decoder layers of the full zoo's base (q, k, v, o, gate, up, down; 30
layers), called as the engine's delta backends call them: the ``lowbit`` backend makes one kernel
call per group of layers reading one input (q/k/v, gate/up; each layer on its own output columns)
for every expert's rows, the ``int4`` backend one kernel call per layer and expert, on rows
converted to bf16 once per group. Timed for 1 to 16 rows of one expert, then one decode step's delta
work for 3 experts at batch 16 (5, 5 and 6 rows). The int4 kernel works on 4 rows at a time (5 to 8
rows cost as 8); the low-bit kernel takes any number. The low-bit kernel's AVX2 build (what CPUs
without AVX512-VNNI get) is timed too where it runs.

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

# (layer widths, in) per group of layers reading one input: q/k/v, o, gate/up, down
GROUPS = [((576, 192, 192), 576), ((576,), 576), ((1536, 1536), 576), ((576,), 1536)]
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

    from meswitch.engine.kernels import int4, lowbit_cpu

    torch.set_num_threads(args.threads)
    isa = lowbit_cpu.isa()  # MESWITCH_LOWBIT_CPU, else the best build: as the engine's lowbit backend chooses
    if isa is None or not int4.available():
        print(f"needs both kernels: low-bit {lowbit_cpu.unavailable_reason() or 'ok'}, int4 {int4.available()}",
              file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)

    def codes(bits: int, out: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        return torch.randint(0, 1 << bits, (out, n), dtype=dtype, generator=g)

    def lowbit_layers(bits: int) -> list[list[list]]:
        """Per layer, per group, per layer of the group: a delta in the low-bit kernel's layout."""
        return [[[lowbit_cpu.build(codes(bits, o, i), torch.arange(i), torch.rand(o, generator=g), None, bits, (o, i),
                                   isa) for o in widths] for widths, i in GROUPS] for _ in range(LAYERS)]

    def int4_layers() -> list[list[list]]:
        """Per layer, per group, per layer of the group: (packed codes, group size, scales) in the int4 layout."""
        return [[[(torch._convert_weight_to_int4pack_for_cpu(codes(4, o, i, torch.int32), 2), int4.group_size(i),
                   torch.rand(i // int4.group_size(i), o, 2, generator=g).bfloat16()) for o in widths]
                 for widths, i in GROUPS] for _ in range(LAYERS)]

    low = {b: [lowbit_layers(b) for _ in SEGMENTS] for b in (1, 2, 3)}  # per bits: one model's deltas per expert
    i4 = [int4_layers() for _ in SEGMENTS]
    columns = [[sum(widths[:j]) for j in range(len(widths))] for widths, _ in GROUPS]  # each layer's first column

    def lowbit_step(b: int, segments, xs: dict, ys: list, isa: str = isa) -> None:  # noqa: ANN001
        """One call per group of layers for every expert's rows ``[s, t)`` (LowbitBackend.add)."""
        for layer in range(LAYERS):
            for j, (_, i) in enumerate(GROUPS):
                lowbit_cpu.sgmv(xs[i], ys[j], [(low[b][e][layer][j][m], s, t, c) for e, (s, t) in enumerate(segments)
                                               for m, c in enumerate(columns[j])], isa)

    def int4_step(segments, xs: dict, ys: list) -> None:  # noqa: ANN001
        """Rows to bf16 once per group, then one call per layer and expert (Int4Backend.add)."""
        for layer in range(LAYERS):
            for j, (widths, i) in enumerate(GROUPS):
                xb = xs[i].to(torch.bfloat16)
                for e, (s, t) in enumerate(segments):
                    for (p, gs, sz), c, o in zip(i4[e][layer][j], columns[j], widths, strict=True):
                        ys[j][s:t, c : c + o].add_(torch._weight_int4pack_mm_for_cpu(xb[s:t], p, gs, sz))

    avx2 = "avx2" in lowbit_cpu.supported_isas() and lowbit_cpu.available("avx2")
    per_rows: dict[str, dict[str, float]] = {}
    print(f"ms per expert over 30 layers ({isa} build)\n\n| rows | low-bit 1 bit | 2 bits | 3 bits | "
          "2 bits, AVX2 build | int4 kernel | int4 / low-bit 2 bits |\n|---|---|---|---|---|---|---|")
    for n in ROWS:
        xs = {k: torch.randn(n, k, generator=g) for k in (576, 1536)}
        ys = [torch.zeros(n, sum(widths)) for widths, _ in GROUPS]
        one = [(0, n)]
        row = {f"lowbit_{b}bit_ms": timed(lambda b=b, one=one, xs=xs, ys=ys: lowbit_step(b, one, xs, ys))
               for b in (1, 2, 3)}
        row["int4_ms"] = timed(lambda one=one, xs=xs, ys=ys: int4_step(one, xs, ys))
        if avx2:
            row["lowbit_2bit_avx2_ms"] = timed(lambda one=one, xs=xs, ys=ys: lowbit_step(2, one, xs, ys, "avx2"))
        per_rows[str(n)] = row
        print(f"| {n} | {row['lowbit_1bit_ms']:.2f} | {row['lowbit_2bit_ms']:.2f} | {row['lowbit_3bit_ms']:.2f} | "
              f"{row.get('lowbit_2bit_avx2_ms', float('nan')):.2f} | {row['int4_ms']:.2f} | "
              f"{row['int4_ms'] / row['lowbit_2bit_ms']:.2f}x |")

    t = SEGMENTS[-1][1]
    xs = {k: torch.randn(t, k, generator=g) for k in (576, 1536)}
    ys = [torch.zeros(t, sum(widths)) for widths, _ in GROUPS]
    step = {f"lowbit_{b}bit_ms": timed(lambda b=b: lowbit_step(b, SEGMENTS, xs, ys)) for b in (1, 2, 3)}
    step["int4_ms"] = timed(lambda: int4_step(SEGMENTS, xs, ys))
    print(f"\none decode step's deltas, 3 experts at batch 16 (rows 5/5/6): low-bit {step['lowbit_1bit_ms']:.1f} / "
          f"{step['lowbit_2bit_ms']:.1f} / {step['lowbit_3bit_ms']:.1f} ms (1/2/3 bits), int4 {step['int4_ms']:.1f} ms "
          f"({step['int4_ms'] / step['lowbit_2bit_ms']:.1f}x the 2-bit time)")
    result = {"machine": machine(), "threads": args.threads, "layers": LAYERS, "groups": GROUPS, "isa": isa,
              "per_expert_rows": per_rows, "step_3_experts_batch_16": step}
    (results_dir() / "cpu_delta_kernels.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
