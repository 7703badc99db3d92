"""Time of ``layout_packed``: a store's packed codes -> the low-bit CPU kernel's tile layout, per whole model.

Loading an expert into the ``lowbit`` backend lays out every linear layer's packed codes
(``lowbit_cpu.layout_packed``); this is most of the load. Times the extension's ``layout_packed``
against ``layout_packed_scalar`` (its first, one-code-at-a-time implementation, kept in the same
extension as a reference) on the linear layers of SmolLM2-135M (per decoder layer: q 576x576, k and v
192x576, o 576x576, gate and up 1536x576, down 576x1536; 30 layers, 210 calls, ~135M codes), random
codes packed by ``meswitch.deltas.pack.pack`` at 1, 2, 3 and 4 bits, with every column quantized or
with a fraction of salient columns left out (``cols``: an ascending random subset, as a record's
``rest_idx``). Reports the best of ``--repeat`` runs in ms per model, one thread by default.

    python benchmarks/layout_packed.py [--layers 30] [--bits 1 2 3 4] [--salient 0.01] [--repeat 3] [--threads 1] [--isa avx2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
          "up": (1536, 576), "down": (576, 1536)}  # one SmolLM2-135M decoder layer, (out, in)


def model_inputs(layers: int, bits: int, salient: float, seed: int) -> list[tuple]:
    """``layout_packed`` arguments ``(packed, bits, n, cols, in, lbits)`` for each linear layer of the model."""
    from meswitch.deltas.pack import pack
    from meswitch.engine.kernels.lowbit_cpu import LAYOUT_BITS

    g = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(layers):
        for out, width in SHAPES.values():
            k = round(width * salient)
            n = width - k
            codes = torch.randint(0, 1 << bits, (out, n), dtype=torch.uint8, generator=g)
            if k:
                cols = torch.randperm(width, generator=g)[:n].sort().values
            else:
                cols = torch.zeros(0, dtype=torch.int64)
            calls.append((pack(codes, bits), bits, n, cols, width, LAYOUT_BITS[bits]))
    return calls


def best_ms(fn, calls: list[tuple], repeat: int) -> float:
    """Best of ``repeat`` runs of ``fn`` over all ``calls``, in ms."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for args in calls:
            fn(*args)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M: 30)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--salient", type=float, default=0.01, help="fraction of columns left out in the 'cols' rows")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default="", help="build of lowbit_cpu.ISAS ('': the best this CPU runs)")
    args = ap.parse_args()

    from meswitch.engine.kernels import lowbit_cpu

    isa, why = lowbit_cpu.choose(args.isa)
    if isa is None:
        raise SystemExit(f"the low-bit CPU kernel is unavailable: {why}")
    mod = lowbit_cpu._build(isa)[0]
    torch.set_num_threads(args.threads)
    print(f"{machine()}; build {isa}; {args.threads} thread(s); {args.layers} layers x {len(SHAPES)} linears\n")
    print("| bits | salient columns | codes (M) | old scalar (ms/model) | new (ms/model) | speed-up |")
    print("|---:|---|---:|---:|---:|---:|")
    for bits in args.bits:
        for salient in (0.0, args.salient):
            calls = model_inputs(args.layers, bits, salient, seed=bits)
            codes = sum(c[0].shape[0] * c[2] for c in calls) / 1e6
            new = best_ms(mod.layout_packed, calls, args.repeat)
            old = best_ms(mod.layout_packed_scalar, calls, args.repeat)
            label = f"{salient:.0%} (cols)" if salient else "none"
            print(f"| {bits} | {label} | {codes:.1f} | {old:.1f} | {new:.1f} | {old / new:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
