"""The Triton multi-expert kernel on a CUDA GPU: correctness, per-layer cost and engine decode speed.

Run on a machine with a CUDA GPU (it needs no zoo: the model and the experts are random, which
does not change speed). Three parts, each printed as a table and kept in the JSON:

1. ``check``: the kernel against the float32 reference (:func:`reference`, each row's
   ``x @ dequantize()^T``) on fresh random deltas of every layout (1-4 bits, salient columns,
   asymmetric grids, bitdelta) in float32, bfloat16 and float16, and on one full-size layer per bit
   width; outputs are poisoned first.
2. ``layers``: one decoder block of Llama-3-8B (q, k, v, o, gate, up, down; bf16 base) at batch
   1, 8 and 16 with 1, 3 and 16 experts whose layers hold 1, 2 or 3 bits (1.5 on average, like the
   default store): the base alone against the base plus the kernel, timed as CUDA-graph replays
   (GPU time, no launch overhead), with the bytes each reads and the bandwidth achieved.
3. ``decode``: :class:`~meswitch.engine.model.ServingModel` over a random Llama model (8B shape
   by default) with 16 synthetic experts, decode tokens/s at batch 1, 8, 16 for the base, one
   expert (its delta through the kernel, and merged), 3 and 16 experts mixed (the ``triton``
   backend), and the same mixed batches with the ``pytorch`` backend on the same packed forms
   (no kernel: codes unpacked per call).

    python benchmarks/gpu_sgmv.py [--model 8b|1b] [--steps 20] [--json docs/results/gpu_sgmv.json]

``--dry-run`` runs ``check`` and ``decode`` on the CPU at toy sizes under Triton's interpreter
(float32 and float16 only, no CUDA graphs, nothing timed that means anything): a test of this
script on a machine without a GPU.

``benchmarks/report.py`` puts that file's tables into docs/RESULTS.md (``make bench`` does not run
this script: CI and the reference machine have no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from meswitch.deltas import decode as decode_record  # noqa: E402
from meswitch.deltas import packed_cols  # noqa: E402
from meswitch.engine.backends.forms import PackedForm  # noqa: E402
from meswitch.engine.kernels import sgmv_triton  # noqa: E402
from meswitch.engine.segments import Segments  # noqa: E402

BATCHES = (1, 8, 16)
EXPERTS = (1, 3, 16)
BITS_MIX = ((1, 0.6), (2, 0.3), (3, 0.1))  # share of layers at each width: 1.5 bits on average
SHAPES = {  # Llama-3-8B decoder block: name -> (out, in)
    "q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
    "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336),
}
MODELS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256),  # --dry-run
}


def random_delta(out: int, n: int, bits: int, gen: torch.Generator, device: str = "cuda") -> PackedForm:
    """A rtn-layout delta with random codes (every byte pattern is valid) and small random scales, as the
    ``triton`` backend holds it (``gen`` on ``device``)."""
    packed = torch.randint(0, 256, (out, packed_cols(n, bits)), dtype=torch.uint8, generator=gen, device=device)
    scale = torch.rand(out, generator=gen, device=device) * 1e-3
    return PackedForm(packed, scale, None, None, torch.zeros(0, dtype=torch.long, device=device),
                      torch.zeros(out, 0, device=device), torch.arange(n, device=device), bits, (out, n), "rtn")


def reference(x: torch.Tensor, ids: list[int], deltas: dict[int, PackedForm], y: torch.Tensor) -> torch.Tensor:
    """The slow reference: ``y[i] += x[i] @ deltas[ids[i]].dequantize()^T`` in float32, nothing for ``-1``."""
    dense = {e: deltas[e].dequantize() for e in set(ids) if e >= 0}
    for i, e in enumerate(ids):
        if e >= 0:
            y[i] += x[i].float() @ dense[e].T
    return y


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def pick_bits(gen: torch.Generator) -> int:
    u, acc = float(torch.rand(1, generator=gen)), 0.0
    for bits, share in BITS_MIX:
        acc += share
        if u < acc:
            return bits
    return BITS_MIX[-1][0]


def ids_for(batch: int, experts: int) -> list[int]:
    """Rows spread round-robin over ``experts`` experts, grouped by expert as the engine orders them."""
    return sorted(i % experts for i in range(batch))


# ---- 1. correctness --------------------------------------------------------------------------------


def check(device: str = "cuda") -> list[dict]:
    from meswitch.compress.codec import encode_delta

    dry = device != "cuda"  # the interpreter: toy sizes, no bf16, no full-size layers
    dtypes = (torch.float32, torch.float16) if dry else (torch.float32, torch.bfloat16, torch.float16)
    rows = []
    gen = torch.Generator().manual_seed(0)
    settings = [("rtn", 1, 0, True), ("rtn", 2, 0, False), ("rtn", 3, 0, True), ("rtn", 4, 0, True),
                ("salient", 3, 5, True), ("salient", 2, 7, False), ("bitdelta", 1, 0, True)]
    for trial in range(2 if dry else 3):
        out, n = (96, 130, 256)[trial], (200, 300, 1000)[trial]
        deltas = {}
        for i, (method, bits, k, sym) in enumerate(settings):
            d = torch.randn(out, n, generator=gen) * 0.02
            kw = {"symmetric": sym, **({"act_sq": torch.rand(n, generator=gen)} if method == "salient" else {})}
            record = decode_record(*encode_delta(d, method, bits, k, **kw))
            deltas[i] = PackedForm.of(record, torch.device(device))  # what the triton backend holds
        ids = sorted([e for e in range(len(settings)) for _ in range(1 + trial * 7)] + [-1])
        table = sgmv_triton.ExpertTable.build(deltas, torch.device(device))
        seg = Segments.from_ids(ids).to(device)
        for dtype in dtypes:
            x = torch.randn(len(ids), n, generator=gen).to(device, dtype)
            y0 = torch.randn(len(ids), out, generator=gen).to(device)
            want = reference(x.float(), ids, deltas, y0.clone())
            for ydtype in dict.fromkeys((torch.float32, dtype)):
                y = sgmv_triton.add_salient(x, seg, deltas, sgmv_triton.sgmv_delta(x, seg, table, y0.to(ydtype, copy=True)))
                sync(device)
                err = float((y.float() - want).norm() / (want - y0).norm())
                rows.append({"shape": [out, n], "rows": len(ids), "x": str(dtype)[6:], "y": str(ydtype)[6:],
                             "rel_err": err, "finite": bool(torch.isfinite(y).all())})
    for bits in () if dry else (1, 2, 3, 4):  # one full-size layer per width, fp32 output into random values
        d = random_delta(4096, 14336, bits, torch.Generator("cuda").manual_seed(bits))
        x = torch.randn(16, 14336, device="cuda", dtype=torch.bfloat16)
        y0 = torch.randn(16, 4096, device="cuda")
        want = y0 + x.float() @ d.dequantize().T
        y = sgmv_triton.sgmv_delta(x, Segments.from_ids([0] * 16).to("cuda"),
                                   sgmv_triton.ExpertTable.build({0: d}, torch.device("cuda")), y0.clone())
        rows.append({"shape": [4096, 14336], "rows": 16, "x": "bfloat16", "y": "float32", "bits": bits,
                     "rel_err": float((y - want).norm() / (want - y0).norm()),
                     "finite": bool(torch.isfinite(y).all())})
    return rows


# ---- 2. one decoder block ---------------------------------------------------------------------------


def graph_ms(fn, reps: int = 50) -> float:
    """Median GPU time of ``fn`` (a list of launches) replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def layers() -> list[dict]:
    gen = torch.Generator("cuda").manual_seed(1)
    weights = {k: torch.randn(o, i, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
               for k, (o, i) in SHAPES.items()}
    bits_gen = torch.Generator().manual_seed(2)
    deltas = {k: {e: random_delta(o, i, pick_bits(bits_gen), gen) for e in range(max(EXPERTS))}
              for k, (o, i) in SHAPES.items()}
    tables = {k: sgmv_triton.ExpertTable.build(deltas[k], torch.device("cuda")) for k in SHAPES}
    base_bytes = sum(w.numel() * 2 for w in weights.values())
    rows = []
    for batch in BATCHES:
        xs = {k: torch.randn(batch, i, device="cuda", dtype=torch.bfloat16, generator=gen) for k, (o, i) in SHAPES.items()}
        ys = {k: torch.empty(batch, o, device="cuda", dtype=torch.bfloat16) for k, (o, i) in SHAPES.items()}

        def base(xs: dict = xs, ys: dict = ys) -> None:
            for k in SHAPES:
                torch.matmul(xs[k], weights[k].T, out=ys[k])

        t_base = graph_ms(base)
        rows.append({"batch": batch, "experts": 0, "ms": t_base, "ratio": 1.0, "bytes": base_bytes,
                     "GBps": base_bytes / t_base / 1e6})
        for n_exp in EXPERTS:
            if n_exp > batch and n_exp > 1:
                continue
            seg = Segments.from_ids(ids_for(batch, n_exp)).to("cuda")
            seg.bounds  # noqa: B018 - built outside the graph

            def mixed(seg: Segments = seg, xs: dict = xs, ys: dict = ys) -> None:
                base(xs, ys)
                for k in SHAPES:
                    sgmv_triton.sgmv_delta(xs[k], seg, tables[k], ys[k])

            t = graph_ms(mixed)
            delta_bytes = sum(deltas[k][e].packed.numel() for k in SHAPES for e in set(seg.experts))
            rows.append({"batch": batch, "experts": n_exp, "ms": t, "ratio": t_base / t,
                         "bytes": base_bytes + delta_bytes, "GBps": (base_bytes + delta_bytes) / t / 1e6,
                         "bound_ratio": base_bytes / (base_bytes + delta_bytes)})
    return rows


def sweep() -> list[dict]:
    """Kernel-only GPU time of one decoder block's deltas under :func:`choose_plan`'s plan and variants."""
    gen = torch.Generator("cuda").manual_seed(5)
    bits_gen = torch.Generator().manual_seed(6)
    deltas = {k: {e: random_delta(o, i, pick_bits(bits_gen), gen) for e in range(16)} for k, (o, i) in SHAPES.items()}
    tables = {k: sgmv_triton.ExpertTable.build(deltas[k], torch.device("cuda")) for k in SHAPES}
    rows = []
    for batch, n_exp in ((1, 1), (8, 3), (16, 16), (16, 1)):
        seg = Segments.from_ids(ids_for(batch, n_exp)).to("cuda")
        seg.bounds  # noqa: B018 - built outside the graph
        longest = max(t - s for s, t in zip(seg.starts, seg.ends, strict=True))
        xs = {k: torch.randn(batch, i, device="cuda", dtype=torch.bfloat16, generator=gen) for k, (o, i) in SHAPES.items()}
        ys = {k: torch.zeros(batch, o, device="cuda", dtype=torch.bfloat16) for k, (o, i) in SHAPES.items()}
        delta_bytes = sum(deltas[k][e].packed.numel() for k in SHAPES for e in set(seg.experts))
        auto = {k: sgmv_triton.choose_plan(longest, len(seg), o, i, torch.device("cuda")) for k, (o, i) in SHAPES.items()}
        variants = {
            "auto": lambda p: p,
            "split 1": lambda p: p._replace(split=1),
            "N x2": lambda p: p._replace(block_n=2 * p.block_n, block_k=max(64, p.block_k // 2)),
            "K x2": lambda p: p._replace(block_k=2 * p.block_k, block_n=max(16, p.block_n // 2)),
            "8 warps": lambda p: p._replace(warps=8),
            "dot": lambda p: sgmv_triton.Plan(16, 64, 128, p.split, True),
            "dot split 1": lambda p: sgmv_triton.Plan(16, 64, 128, 1, True),
            "registers, 8 rows": lambda p: sgmv_triton.Plan(8, 16, 64, p.split, False),
        }
        for name, vary in variants.items():
            plans = {k: vary(auto[k]) for k in SHAPES}

            def run(plans: dict = plans, seg: Segments = seg, xs: dict = xs, ys: dict = ys) -> None:
                for k in SHAPES:
                    sgmv_triton.sgmv_delta(xs[k], seg, tables[k], ys[k], plans[k])

            try:
                t = graph_ms(run, reps=30)
            except Exception as exc:  # noqa: BLE001 - a variant the compiler rejects is reported, not fatal
                rows.append({"batch": batch, "experts": n_exp, "variant": name, "plan": f"failed: {exc}"[:80]})
                continue
            rows.append({"batch": batch, "experts": n_exp, "variant": name, "plan": str(tuple(plans["gate"])),
                         "us": 1e3 * t, "GBps": delta_bytes / t / 1e6})
    return rows


# ---- 3. engine decode -------------------------------------------------------------------------------


def use_backend(model, backend) -> None:  # noqa: ANN001
    """Serve ``model``'s deltas through ``backend`` from now on (forms are kept: both backends read PackedForms)."""
    from meswitch.engine.layers import ExpertLinear, SharedInputLinears

    for mod in model.modules():
        if isinstance(mod, ExpertLinear):
            mod.backend = backend
        if isinstance(mod, (ExpertLinear, SharedInputLinears)):
            mod.state.clear()


def decode(model_size: str, steps: int, device: str = "cuda", batches: tuple[int, ...] = BATCHES) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from meswitch.engine.backends.pytorch import PyTorchBackend
    from meswitch.engine.backends.triton import TritonBackend
    from meswitch.engine.model import SeqSlice, ServingModel, StepBatch

    cfg = LlamaConfig(**MODELS[model_size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32).eval()
    triton = TritonBackend(device)  # named directly: backends.select would refuse it on a CPU (--dry-run)
    model = ServingModel(hf, triton)
    gen, bits_gen = torch.Generator(device).manual_seed(3), torch.Generator().manual_seed(4)
    n_experts = max(EXPERTS)
    linears = [mod for name, mod in model.linears() if name != "lm_head"]
    for mod in linears:
        out, n = mod.shape
        for e in range(n_experts):
            mod.set_delta(e, random_delta(out, n, pick_bits(bits_gen), gen, device))
    cache = model.new_cache(max(batches), 512)
    prompt = 64 if device == "cuda" else 8

    cache.reserve(prompt + 3 + steps + 1)

    def rate(expert_ids: list[int], steps: int = steps) -> float:
        seqs = [SeqSlice(slot, 0, prompt, e) for slot, e in enumerate(expert_ids)]
        ids = torch.randint(0, cfg.vocab_size, (prompt * len(seqs),), device=device)
        model(ids, StepBatch.build(seqs, device), cache)  # prefill
        tok = torch.randint(0, cfg.vocab_size, (len(seqs),), device=device)
        for warm in (True, False):
            sync(device)
            t0 = time.perf_counter()
            n = 3 if warm else steps
            for i in range(n):
                pos = prompt + i if warm else prompt + 3 + i
                batch = StepBatch.build([SeqSlice(s.slot, pos, 1, s.expert) for s in seqs], device)
                model(tok, batch, cache)
            sync(device)
        return len(seqs) * steps / (time.perf_counter() - t0)

    rows = []
    for batch in batches:
        base = rate([-1] * batch)
        rows.append({"batch": batch, "case": "base", "tok_s": base, "ratio": 1.0})
        cases = [("one", [0] * batch), ("mixed3", ids_for(batch, 3)), ("mixed16", ids_for(batch, 16))]
        for case, ids in cases:
            if case != "one" and len(set(ids)) < 2:
                continue
            r = rate(ids)
            rows.append({"batch": batch, "case": case, "tok_s": r, "ratio": r / base})
        for mod in linears:
            mod.merge(0)
        r = rate([0] * batch)
        rows.append({"batch": batch, "case": "one (merged)", "tok_s": r, "ratio": r / base})
        for mod in linears:
            mod.merged.clear()
        if batch == max(batches):  # the PyTorch path for comparison: codes unpacked on every call
            use_backend(model, PyTorchBackend(device))
            try:
                for case, ids in cases[1:]:
                    if len(set(ids)) < 2:
                        continue
                    r = rate(ids, steps=3)  # seconds per step
                    rows.append({"batch": batch, "case": f"{case} (no kernel)", "tok_s": r, "ratio": r / base})
            finally:
                use_backend(model, triton)
    return rows


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(m for m in MODELS if m != "toy"), default="8b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parts", default="check,layers,decode,sweep")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true",
                    help="check and decode on the CPU at toy sizes under Triton's interpreter (tests this script)")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is first imported
        result: dict = {"device": "cpu (Triton interpreter, --dry-run)", "torch": torch.__version__}
        parts = {"check": lambda: check("cpu"),
                 "decode": lambda: decode("toy", min(args.steps, 2), "cpu", batches=(1, 4))}
        if unknown := set(args.parts.split(",")) - set(parts):
            print(f"--dry-run runs check and decode only, not {sorted(unknown)}", file=sys.stderr)
            args.parts = ",".join(p for p in args.parts.split(",") if p in parts)
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark measures the GPU kernel (--dry-run tests it on the CPU)", file=sys.stderr)
        return 2
    else:
        result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        parts = {"check": check, "layers": layers, "sweep": sweep, "decode": lambda: decode(args.model, args.steps)}
    cols = {"check": ["shape", "rows", "x", "y", "bits", "rel_err", "finite"],
            "sweep": ["batch", "experts", "variant", "plan", "us", "GBps"],
            "layers": ["batch", "experts", "ms", "ratio", "bound_ratio", "GBps"],
            "decode": ["batch", "case", "tok_s", "ratio"]}
    status = 0
    for name in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            result[name] = parts[name]()
            print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n\n{table(result[name], cols[name])}", flush=True)
        except Exception:  # noqa: BLE001 - keep the other parts' numbers
            status = 1
            result[name] = {"error": traceback.format_exc()}
            print(f"\n## {name} FAILED\n{traceback.format_exc()}", flush=True)
        if not args.dry_run:
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
