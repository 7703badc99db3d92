"""MultiExpertLinear modes on a decode-step-like call, as ratios to the base-only ``x @ W^T``.

One SmolLM2-sized MLP projection (in=576, out=1536), T = 1, 8, 16 rows, rows spread round-robin
over 1, 3 or 16 experts (shuffled), bits 1 and 2 with k = 16 salient columns. Every timing is
taken in the same process as its baseline; the segment grouping (built once per step and shared
by all layers) is outside the timed call. Also prints the bytes each residency keeps per expert.

    python benchmarks/delta_linear.py [--min-time 0.2] [--threads 1] [--device cpu]
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
# (column label, MultiExpertLinear mode, resident override)
VARIANTS = [
    ("reference", "reference", "auto"),
    ("seg-dense", "segment-dense", "auto"),
    ("seg-struct", "segment-structured", "auto"),
    ("seg-packed", "segment-structured", None),
    ("merged", "merged", "auto"),
]


def make_deltas(bits: int, n: int, device: str) -> dict:
    import torch

    from meswitch.compress.codec import encode_delta
    from meswitch.engine.delta_linear import PackedDelta

    g = torch.Generator().manual_seed(bits)
    out = {}
    for e in range(n):
        delta = torch.randn(OUT, IN, generator=g) * 1e-3
        act_sq = torch.exp(torch.randn(IN, generator=g))
        fields, meta = encode_delta(delta, "salient", bits, K, act_sq)
        out[e] = PackedDelta.from_fields(fields, meta).to(device)
    return out


def time_us(fn, min_time: float, threads: int) -> float:
    from torch.utils.benchmark import Timer

    m = Timer("fn()", globals={"fn": fn}, num_threads=threads).blocked_autorange(min_run_time=min_time)
    return m.median * 1e6


def run(min_time: float, threads: int, device: str) -> list[dict]:
    import torch
    from torch import nn

    from meswitch.engine.delta_linear import MultiExpertLinear
    from meswitch.engine.segments import Segments

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False).to(device)
    w = base.weight.detach()
    rows = []
    for bits in BITS:
        deltas = make_deltas(bits, max(EXPERTS), device)
        # the layers share the deltas, so each variant re-establishes its residency before timing
        layers = {
            label: MultiExpertLinear(base, deltas, mode, resident) for label, mode, resident in VARIANTS
        }
        for n_exp in EXPERTS:
            for t in ROWS:
                ids = [i % n_exp for i in range(t)]
                ids = [ids[i] for i in torch.randperm(t, generator=torch.Generator().manual_seed(t)).tolist()]
                seg = Segments.from_ids(ids).to(device)
                x = torch.randn(t, IN, device=device)
                row = {"bits": bits, "experts": n_exp, "T": t, "segments": len(seg)}
                with torch.inference_mode():
                    row["base_us"] = time_us(lambda x=x: x @ w.T, min_time, threads)
                    for label, mode, resident in VARIANTS:
                        layer = layers[label]
                        layer.set_mode(mode, resident)
                        layer(x, seg)  # warm-up, fills the merged cache
                        us = time_us(lambda layer=layer, x=x, seg=seg: layer(x, seg), min_time, threads)
                        row[label] = us / row["base_us"]
                rows.append(row)
    return rows


def residency_bytes(device: str) -> dict[str, int]:
    deltas = make_deltas(2, 1, device)
    d = deltas[0]
    return {str(r): d.set_resident(r).nbytes() for r in (None, "codes", "dense")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    rows = run(args.min_time, args.threads, args.device)
    print(f"# delta_linear: in={IN} out={OUT} k={K}, {machine()}, threads={args.threads}, {args.device}")
    print("# time / time(x @ W^T) in the same process; 'merged' falls back to seg-packed on mixed batches")
    cols = [label for label, _, _ in VARIANTS]
    head = f"{'bits':>4} {'exp':>3} {'T':>3} {'segs':>4} {'base us':>8} " + " ".join(f"{c:>10}" for c in cols)
    print(head)
    print("-" * len(head))
    for r in rows:
        ratios = " ".join(f"{r[c]:>10.2f}" for c in cols)
        print(
            f"{r['bits']:>4} {r['experts']:>3} {r['T']:>3} {r['segments']:>4} {r['base_us']:>8.1f} {ratios}"
        )
    mem = residency_bytes(args.device)
    print(
        f"# bytes per expert (2-bit, k={K}): "
        + ", ".join(f"resident={k}: {v / 1e6:.2f} MB" for k, v in mem.items())
    )
    print(f"# base weight float32: {IN * OUT * 4 / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
