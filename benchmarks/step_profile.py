"""Where a decode step's time goes: the kernels themselves against everything else.

Cases (each at batch 1 and 16, one :class:`~meswitch.engine.Engine` over the store's base):
  base      the base model alone
  mixed16   16 quantized experts, requests round-robin (at batch 1: one expert's delta path)
  lora16    16 LoRA experts, requests round-robin
The expert cases run with ``max_merged=0``: every step takes the delta path (no merged weights,
which would make a batch of one expert the base's matmul).

Method. A step is one :meth:`Engine.step` of a decode (every request has been prefilled):
  - **step ms**: wall time per step, no instrumentation, the median of ``--repeats`` timed runs of
    ``--steps`` steps taken in turn with the other cases at the same batch (drift on a shared machine
    falls on every case alike); **tok/s** is ``batch * 1000 / step ms``;
  - **kernels ms**: one more run of ``--steps`` steps under :mod:`torch.profiler` (CPU activities, no
    shapes or stacks); the self CPU time of the matmul kernels per step: ``aten::mm``, ``addmm``,
    ``bmm``, ``baddbmm``, ``_weight_int4pack_mm_for_cpu``, ``_scaled_dot_product_*`` (attention), and
    meswitch's own low-bit and LoRA kernels (pybind calls the profiler does not see: wrapped here in a
    ``record_function`` for the run);
  - **rest ms** = step ms - kernels ms: Python, op dispatch, small elementwise ops (norms, rope,
    activations, KV-cache writes, masks), sampling, detokenization and scheduling;
  - **process CPU ms**: CPU time of the process per step in the same runs (every thread): what the
    step costs the machine, less sensitive than wall time to other jobs sharing the cores;
  - **aten ops**: ATen operator calls per step in the profiled run (nested calls included): the
    dispatch work, independent of the machine's load;
  - **forward ms**: the same uninstrumented runs, time inside ``ServingModel.forward`` (a timer
    around the call); step - forward is the engine's own work around the model (batch layout,
    sampling, logprobs, detokenization, stop strings, bookkeeping).
The profiled run also lists the non-kernel ops with the most self time (``--top``).

    python benchmarks/step_profile.py [--store DIR] [--steps 32] [--repeats 3] [--threads 2]
                                      [--cases base,mixed16,lora16] [--out step_profile]

Writes ``docs/results/<out>.json`` and ``docs/results/<out>.md`` (the table printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402
from engine import PROMPT  # noqa: E402

BATCHES = (1, 16)
CASES = ("base", "mixed16", "lora16")
WARMUP = 8  # decode steps before timing: loads, kernel builds, caches
KERNEL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm_for_cpu",
              "aten::_weight_int4pack_mm", "meswitch::lowbit_sgmv", "meswitch::lora_sgmv")
KERNEL_PREFIXES = ("aten::_scaled_dot_product",)


def is_kernel(name: str) -> bool:
    """Whether a profiler event ``name`` is a kernel (a matmul or attention's fused kernel) rather than overhead."""
    return name in KERNEL_OPS or name.startswith(KERNEL_PREFIXES)


def case_experts(store: Any) -> dict[str, list[str | None]]:
    """Case -> the experts its requests use round-robin (``None``: the base)."""
    lora = sorted(n for n in store.experts if n.startswith("lora-"))
    quant = sorted(n for n in store.experts if not n.startswith("lora-"))
    return {"base": [None], "mixed16": quant[:16], "lora16": lora[:16]}


class ForwardTimer:
    """Wraps ``engine.model.forward`` (an instance attribute over the method) and sums its wall time."""

    def __init__(self, engine: Any) -> None:
        self.total = 0.0
        model = engine.model
        inner = model.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        model.forward = timed


def start(engine: Any, experts: list[str | None], batch: int, steps: int) -> None:
    """Queue ``batch`` greedy requests (expert ``experts[i % len]``) of ``steps + 1`` tokens and run the
    prefill step, so that each further step is a decode step of the whole batch."""
    from meswitch.engine import Request, SamplingParams

    p = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(Request(prompt=PROMPT, expert=experts[i % len(experts)], params=p))
    engine.step()


def timed_decode(engine: Any, timer: ForwardTimer, experts: list[str | None], batch: int,
                 steps: int) -> tuple[float, float, float]:
    """(ms per decode step, ms of it inside the model's forward, CPU ms of this process per step), prefill
    excluded."""
    start(engine, experts, batch, steps)
    f0 = timer.total
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    while engine.has_unfinished():
        engine.step()
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return 1000 * wall / n, 1000 * (timer.total - f0) / n, 1000 * cpu / n


@contextmanager
def labelled_kernels() -> Iterator[None]:
    """Wrap meswitch's pybind kernels (low-bit, LoRA) in ``record_function`` so the profiler sees them."""
    import torch

    from meswitch.engine.kernels import lora_cpu, lowbit_cpu

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def inner(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return inner

    saved = lowbit_cpu.sgmv, lora_cpu.sgmv
    lowbit_cpu.sgmv = wrap(saved[0], "meswitch::lowbit_sgmv")
    lora_cpu.sgmv = wrap(saved[1], "meswitch::lora_sgmv")
    try:
        yield
    finally:
        lowbit_cpu.sgmv, lora_cpu.sgmv = saved


def profiled_decode(engine: Any, experts: list[str | None], batch: int, steps: int,
                    top: int) -> tuple[float, dict[str, float], list[tuple[str, float, int]], float]:
    """(kernel ms per step, kernel ms per step by op, the ``top`` non-kernel ops as (name, ms per step,
    calls per step), ops with self time per step) from one profiled run of ``steps`` decode steps."""
    from torch.profiler import ProfilerActivity, profile

    start(engine, experts, batch, steps)
    n = 0
    with labelled_kernels(), profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished():
            engine.step()
            n += 1
    kernels: dict[str, float] = {}
    others: list[tuple[str, float, int]] = []
    events = prof.key_averages()
    ops = sum(ev.count for ev in events if ev.key.startswith("aten::")) / n
    for ev in events:
        ms = ev.self_cpu_time_total / 1000 / n
        if is_kernel(ev.key):
            kernels[ev.key] = ms
        elif ev.self_cpu_time_total > 0:
            others.append((ev.key, ms, round(ev.count / n)))
    others.sort(key=lambda r: -r[1])
    return sum(kernels.values()), kernels, others[:top], ops


def run_case(engine: Any, timer: ForwardTimer, cases: dict[str, list[str | None]], batch: int, steps: int,
             repeats: int, top: int) -> dict[str, dict[str, Any]]:
    """Every case at ``batch``: warm-up, ``repeats`` timed runs in turn, then one profiled run each."""
    for experts in cases.values():
        timed_decode(engine, timer, experts, batch, WARMUP)
    samples: dict[str, list[tuple[float, float, float]]] = {c: [] for c in cases}
    for _ in range(repeats):
        for case, experts in cases.items():
            samples[case].append(timed_decode(engine, timer, experts, batch, steps))
    out = {}
    for case, experts in cases.items():
        step_ms = statistics.median(s for s, _, _ in samples[case])
        fwd_ms = statistics.median(f for _, f, _ in samples[case])
        cpu_ms = statistics.median(c for _, _, c in samples[case])
        k_ms, by_op, others, ops = profiled_decode(engine, experts, batch, steps, top)
        out[case] = {"step_ms": step_ms, "forward_ms": fwd_ms, "kernel_ms": k_ms, "rest_ms": step_ms - k_ms,
                     "outside_forward_ms": step_ms - fwd_ms, "tokens_per_s": batch * 1000 / step_ms,
                     "cpu_ms": cpu_ms, "aten_ops": ops,
                     "samples_step_ms": [s for s, _, _ in samples[case]], "kernel_ms_by_op": by_op,
                     "top_other_ops": [{"op": n, "ms": ms, "calls": c} for n, ms, c in others]}
        print(f"batch {batch:2d} {case:8s}: step {step_ms:6.1f} ms (samples "
              f"{', '.join(f'{s:.1f}' for s, _, _ in samples[case])}), cpu {cpu_ms:.1f} ms, {ops:.0f} ops, kernels {k_ms:6.1f} ms, "
              f"rest {step_ms - k_ms:6.1f} ms, outside forward {step_ms - fwd_ms:5.1f} ms",
              file=sys.stderr, flush=True)
    return out


def table(r: dict[str, Any]) -> str:
    """The results as markdown: one row per case and batch."""
    lines = [f"# Decode step profile ({r['machine']}, {r['threads']} threads, {r['steps']} steps, "
             f"median of {r['repeats']} runs; store {r['store']})", "",
             "| case | batch | step ms | kernels ms | rest ms | rest share | of it outside the forward ms | tok/s "
             "| process CPU ms | aten ops |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for b, cases in r["results"].items():
        for case, c in cases.items():
            lines.append(f"| {case} | {b} | {c['step_ms']:.1f} | {c['kernel_ms']:.1f} | {c['rest_ms']:.1f} | "
                         f"{c['rest_ms'] / c['step_ms']:.0%} | {c['outside_forward_ms']:.1f} | "
                         f"{c['tokens_per_s']:.1f} | {c['cpu_ms']:.1f} | {c['aten_ops']:.0f} |")
    lines += ["", "Non-kernel ops with the most self time (profiled run, ms per step, calls per step):", ""]
    for b, cases in r["results"].items():
        for case, c in cases.items():
            ops = ", ".join(f"{o['op']} {o['ms']:.2f} ({o['calls']})" for o in c["top_other_ops"])
            lines.append(f"- {case}, batch {b}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/meswitch/stores/bench16")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--top", type=int, default=8, help="non-kernel ops listed per case")
    ap.add_argument("--out", default="step_profile", help="result file stem under docs/results")
    args = ap.parse_args(argv)

    import torch

    from meswitch.engine import Engine, EngineConfig
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore

    torch.set_num_threads(args.threads)
    store = DeltaStore.open(args.store)
    base, tok = load_checkpoint(Path(store.extra["base_path"]))
    cases = {c: e for c, e in case_experts(store).items() if c in args.cases.split(",")}
    # One engine for every case (a second ServingModel over the same base would re-stack its weights).
    engine = Engine(store, base, tok, EngineConfig(max_batch=16, max_merged=0), check_base=False)
    timer = ForwardTimer(engine)
    results: dict[str, Any] = {"machine": machine(), "threads": args.threads, "steps": args.steps,
                               "repeats": args.repeats, "store": str(args.store),
                               "backend": engine.backend_selection.describe(),
                               "results": {}}
    for b in BATCHES:
        results["results"][str(b)] = run_case(engine, timer, cases, b, args.steps, args.repeats, args.top)
    md = table(results)
    print(md)
    out = results_dir()
    (out / f"{args.out}.json").write_text(json.dumps(results, indent=2))
    (out / f"{args.out}.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
