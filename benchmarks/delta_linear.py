"""Every delta backend through ``ExpertLinear`` on a decode-step-like call, against the ``dense`` backend.

One SmolLM2-sized MLP projection (in=576, out=1536, bias-free), T = 1, 8, 16 rows spread over 1, 3
or 16 experts (grouped by expert, as the engine orders a step's rows), bits 1 and 2 with k = 16
salient columns. Each backend registered in :data:`meswitch.engine.backends.BACKENDS` that runs on
the device gets its own layer over the same base and stored deltas; the base-only ``x @ W^T`` and
every backend are timed in the same process, and each is printed as ms and as a ratio to the
``dense`` backend (one float32 matmul per expert). The step's segment grouping (built once per step
and shared by all layers) is outside the timed call. Also prints the bytes each backend holds per expert.

    python benchmarks/delta_linear.py [--min-time 0.2] [--threads 1] [--device cpu] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

IN, OUT, K = 576, 1536, 16
ROWS = (1, 8, 16)
EXPERTS = (1, 3, 16)
BITS = (1, 2)
BASELINE = "dense"  # ratios are to this backend's time in the same run


def stored_deltas(bits: int, n: int) -> list[tuple[dict, dict]]:
    """``n`` experts' stored (fields, meta) of one layer: salient deltas at ``bits`` with ``K`` salient columns."""
    import torch

    from meswitch.compress.codec import encode_delta

    g = torch.Generator().manual_seed(bits)
    out = []
    for _ in range(n):
        delta = torch.randn(OUT, IN, generator=g) * 1e-3
        act_sq = torch.exp(torch.randn(IN, generator=g))
        out.append(encode_delta(delta, "salient", bits, K, act_sq))
    return out


def runnable_backends(device: str, names: list[str], isa: str | None) -> tuple[dict, list[str]]:
    """``{name: backend}`` of those that run on ``device`` (no fallback: a backend that cannot run is
    left out), and a line per backend left out saying why."""
    from meswitch.engine import backends

    chosen, skipped = {}, []
    for name in names:
        try:
            chosen[name] = backends.create(name, device, isa=isa)
        except RuntimeError as exc:
            skipped.append(f"{name}: {exc}")
    return chosen, skipped


def time_ms(fn, min_time: float, threads: int) -> float:
    from torch.utils.benchmark import Timer

    m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_time)
    return m.median * 1e3


def run(min_time: float, threads: int, device: str, chosen: dict, rows_: tuple, experts_: tuple,
        bits_: tuple) -> tuple[list[dict], dict[str, int]]:
    """Timings per (bits, experts, T) and each backend's bytes per expert (2-bit or the first bits)."""
    import torch
    from torch import nn

    from meswitch.deltas import decode
    from meswitch.engine.layers import ExpertLinear
    from meswitch.engine.segments import Segments

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False).to(device)
    w = base.weight.detach()
    rows, nbytes = [], {}
    for bits in bits_:
        records = [decode(f, m) for f, m in stored_deltas(bits, max(experts_))]
        layers = {}
        for name, backend in chosen.items():
            layers[name] = layer = ExpertLinear(base, backend)
            for e, record in enumerate(records):
                layer.set_delta(e, backend.prepare(record))
            if bits == (2 if 2 in bits_ else bits_[0]):
                nbytes[name] = layer.deltas[0].nbytes()
        for n_exp in experts_:
            for t in rows_:
                if n_exp > t and n_exp > 1:
                    continue  # fewer rows than experts: some experts would have no rows
                seg = Segments.from_ids(sorted(i % n_exp for i in range(t))).to(device)
                x = torch.randn(t, IN, device=device)
                row = {"bits": bits, "experts": n_exp, "T": t, "segments": len(seg)}
                with torch.inference_mode():
                    row["base"] = time_ms(lambda x=x: x @ w.T, min_time, threads)
                    for name, layer in layers.items():
                        layer(x, seg)  # warm-up: kernels built, per-layer state filled
                        row[name] = time_ms(lambda layer=layer, x=x, seg=seg: layer(x, seg), min_time, threads)
                rows.append(row)
    return rows, nbytes


def print_table(rows: list[dict], names: list[str], ratio_to: str | None) -> None:
    cols = ["base", *names]
    head = f"| bits | experts | T | {' | '.join(f'{c} ms' for c in cols)} |"
    if ratio_to:
        head += f" {' | '.join(f'{c} / {ratio_to}' for c in names if c != ratio_to)} |"
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        line = f"| {r['bits']} | {r['experts']} | {r['T']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
        if ratio_to:
            line += " " + " | ".join(f"{r[c] / r[ratio_to]:.2f}x" for c in names if c != ratio_to) + " |"
        print(line)


def main(argv: list[str] | None = None) -> int:
    from meswitch.engine.backends import BACKENDS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backend names")
    ap.add_argument("--isa", default=None,
                    help="the low-bit kernel's build (default: MESWITCH_LOWBIT_CPU, else the best)")
    ap.add_argument("--quick", action="store_true", help="T 1 and 16, 1 and 3 experts, 2 bits, 0.05 s per timing")
    args = ap.parse_args(argv)

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}; expected names from {list(BACKENDS)}")
    chosen, skipped = runnable_backends(args.device, names, args.isa)
    if not chosen:
        print(f"no backend runs on {args.device}: {'; '.join(skipped)}", file=sys.stderr)
        return 1
    shapes = ((1, 16), (1, 3), (2,), 0.05) if args.quick else (ROWS, EXPERTS, BITS, args.min_time)
    rows, nbytes = run(shapes[3], args.threads, args.device, chosen, *shapes[:3])
    ratio_to = BASELINE if BASELINE in chosen else "reference" if "reference" in chosen else None
    print(f"# delta_linear: in={IN} out={OUT} k={K}, {machine()}, threads={args.threads}, {args.device}")
    for name, backend in chosen.items():
        print(f"# {name}: {backend.describe()}")
    for line in skipped:
        print(f"# left out: {line}")
    print(f"# ms per ExpertLinear call (median); ratios: time / time({ratio_to}) in the same run\n")
    print_table(rows, list(chosen), ratio_to)
    print(f"\n# bytes per expert held by each backend ({2 if 2 in shapes[2] else shapes[2][0]}-bit, k={K}): "
          + ", ".join(f"{k}: {v / 1e6:.2f} MB" for k, v in nbytes.items()))
    print(f"# base weight float32: {IN * OUT * 4 / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
