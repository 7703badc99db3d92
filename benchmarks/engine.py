"""Engine decode throughput, memory and expert load time on the full zoo's store, as ratios to the base.

Cases (decode tokens/s, prefill excluded, batch sizes 1, 8, 16, every case in this one process):
  (a) base      the base model alone
  (b) one       one expert
  (c) mixed3    the 3 zoo experts, requests round-robin
  (d) mixed16   16 experts (the 3 zoo experts stored under 16 names, each loaded separately)
  (f) lora16    16 PEFT LoRA experts (rank 16 on q, k, v, o, gate, up, down; random factors of a
                fine-tune's magnitude, made with peft on the store's base), requests round-robin
  (e) swap      what users do today: one transformers model per expert, loaded from disk whenever
                a request needs another expert (32 new tokens per request)
under policies (an EngineConfig ``backend`` and ``max_merged`` each): ``default`` (EngineConfig's on a
CPU: the ``lowbit`` delta backend, meswitch's low-bit kernel, in mixed batches, merged weights for up
to 3 experts that have had the batch to themselves for 16 steps), ``no-merge``, ``int4`` (the default
with the ``int4`` backend, PyTorch's int4 kernel, instead: the same-run baseline for the low-bit
kernel) and ``exact`` (the ``reference`` backend, no merged weights: each delta dequantized on every
call; mixed16 is skipped for it, minutes per point). A policy whose backend cannot run here falls
back (``Engine.backend_selection``, printed); its limits use the backend that ran. Also resident
memory for 1, 3 and 16 experts against as many full models, the time to bring an expert in from
disk, and per case the bytes of weights read and FLOPs per decode step, the limit they imply on
this machine (bandwidth and GFLOPS measured here) and the achieved fraction of it.

Each tokens/s figure is the median of ``--repeats`` timed runs taken in turn with the other cases
at the same batch size (base, one, mixed3, mixed16, base, ...), so that drift on a shared machine
falls on every case alike instead of on whichever ran last.

The store is ``~/.cache/meswitch/stores/full`` (the full zoo's) unless ``--store DIR`` names another;
the 16-expert copy and the LoRA experts are cached beside it (``stores/bench16``, their adapters in
``stores/lora16-adapters/<base fingerprint>``) and rebuilt when their source changes. ``--policies`` and ``--cases`` run a
subset (``base`` always runs: every ratio is to it).

    python benchmarks/engine.py [--store DIR] [--steps 16] [--repeats 3] [--threads 2] [--json]
                                [--policies default,int4] [--cases base,lora16]
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

BATCHES = (1, 8, 16)
PROMPT = "Write a short story about a cat named Tom who learns to cook."
POLICIES = {  # EngineConfig fields
    "default": {"max_merged": 3, "backend": "lowbit"},
    "no-merge": {"max_merged": 0, "backend": "lowbit"},
    "int4": {"max_merged": 3, "backend": "int4"},
    "exact": {"max_merged": 0, "backend": "reference"},
}
CASES = ["base", "one", "mixed3", "mixed16", "lora16"]
MEMORY = {"packed": "reference", "packed+lowbit": "lowbit", "packed+int4": "int4"}  # memory row -> backend
WARMUP = 20  # decode steps before timing: loads, and merges after EngineConfig.merge_after solo steps


def many_experts_store(src, n: int, root: Path):
    """A store holding ``n`` experts: ``src``'s experts round-robin under new names (cached at ``root``;
    a copy whose source expert has since been recompressed is replaced)."""
    from meswitch.store import DeltaStore
    from meswitch.store.manifest import RESERVED_LAYER_KEYS

    names = src.experts
    want = [f"{names[i % len(names)]}-{i}" for i in range(n)]
    store = DeltaStore.create(root, src.base["fingerprint"], {k: v for k, v in src.base.items() if k != "fingerprint"})
    store.set_extra("base_path", src.extra["base_path"])
    for i, name in enumerate(want):
        source = src.expert_meta(names[i % len(names)])["sha256"]
        if name in store.experts and store.expert_meta(name)["meta"].get("source_sha256") == source:
            continue  # a copy of the source's current version: keep it
        layers, entry = src.load_expert(names[i % len(names)])
        meta = {lay: {k: v for k, v in m.items() if k not in RESERVED_LAYER_KEYS} for lay, m in entry["layers"].items()}
        store.add_expert(name, layers, meta, {**entry["meta"], "source_sha256": entry["sha256"]}, overwrite=True)
    return store, want


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK, LORA_ALPHA = 16, 32
LORA_SIZE = 0.02  # each adapted layer's delta: about this fraction of its base weight's std per element


def random_adapters(base, names: list[str], root: Path) -> dict[str, Path]:
    """A PEFT LoRA adapter of ``base`` per name, saved under ``root`` by peft (those already there kept):
    rank :data:`LORA_RANK` on :data:`LORA_TARGETS`, ``lora_A ~ N(0, 1/in)`` and ``lora_B`` scaled so that
    ``scale * B @ A`` has :data:`LORA_SIZE` of the base weight's std (a trained adapter's order)."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    dirs = {n: root / n for n in names}
    todo = [n for n, d in dirs.items() if not (d / "adapter_model.safetensors").is_file()]
    if not todo:
        return dirs
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA,
                                                          target_modules=LORA_TARGETS))
    scale = LORA_ALPHA / LORA_RANK
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    for i, name in enumerate(names):
        if name not in todo:
            continue
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for m in layers:
                a, b, w = m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.weight
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * (LORA_SIZE * float(w.std()) / (scale * LORA_RANK ** 0.5)))
        model.save_pretrained(dirs[name])
    return dirs


def lora_experts(store, base, n: int, root: Path) -> list[str]:
    """``n`` random LoRA experts (:func:`random_adapters`, adapters under ``root``) added to ``store`` with
    ``compress_into_store`` unless it holds them already; returns their names."""
    from meswitch.compress.config import CompressConfig
    from meswitch.jobs.compress_store import compress_into_store

    names = [f"lora-{i}" for i in range(n)]
    dirs = random_adapters(base, names, root)
    missing = {name: d for name, d in dirs.items() if name not in store.experts
               or store.expert_meta(name)["meta"].get("adapter_path") != str(d.resolve())}
    if missing:
        compress_into_store(Path(store.extra["base_path"]), missing, store.path, None, CompressConfig())
    return names


def decode_rate(engine, experts: list, batch: int, steps: int) -> float:
    """Decode tokens/s of ``batch`` requests (expert ``experts[i % len]``), first (prefill) step excluded."""
    from meswitch.engine import Request, SamplingParams

    p = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(Request(prompt=PROMPT, expert=experts[i % len(experts)], params=p))
    engine.step()  # admission, expert loads and prefill
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return batch * steps / (time.perf_counter() - t0)


def machine_limits(model) -> tuple[float, float, dict[str, float]]:
    """(bytes/s, FLOP/s) of fp32 ``x @ W^T`` over every linear weight of ``model``, at batch 1 and 16,
    and the FLOP/s of the delta kernels (``int4``, ``lowbit`` at 2 bits) over the same shapes at
    batch 16 (those this machine has)."""
    import torch

    from meswitch.engine.kernels import int4, lowbit_cpu

    ws = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    nbytes = sum(w.numel() * 4 for w in ws)
    flops = sum(2 * w.numel() for w in ws)

    def timed(fn) -> float:
        fn()  # weights touched, kernels warm
        best = float("inf")
        for _ in range(3):  # the best of three: what the machine can do, not its neighbours' noise
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    out = []
    for b in (1, 16):
        xs = {w.shape[1]: torch.randn(b, w.shape[1]) for w in ws}
        out.append(timed(lambda xs=xs: [xs[w.shape[1]] @ w.T for w in ws]))
    lin = [w for w in ws if int4.group_size(w.shape[1]) and w.shape[0] % 16 == 0 and w.shape[0] < 8192]  # no head
    rates: dict[str, float] = {}
    lin_flops = sum(2 * w.numel() for w in lin) * 16
    g = torch.Generator().manual_seed(0)
    isa = lowbit_cpu.isa()  # MESWITCH_LOWBIT_CPU, else the best build, as the engine's lowbit backend chooses
    if isa and lin:
        low = [lowbit_cpu.build(torch.randint(0, 4, w.shape, dtype=torch.uint8, generator=g),
                                torch.arange(w.shape[1]), torch.rand(w.shape[0], generator=g), None, 2,
                                tuple(w.shape), isa) for w in lin]
        xf = {w.shape[1]: torch.randn(16, w.shape[1]) for w in lin}
        ys = {w.shape[0]: torch.zeros(16, w.shape[0]) for w in lin}
        rates["lowbit"] = lin_flops / timed(lambda: [lowbit_cpu.sgmv(xf[w.shape[1]], ys[w.shape[0]], [(d, 0, 16)], isa)
                                                     for w, d in zip(lin, low, strict=True)])
    if not int4.available() or not lin:
        return nbytes / out[0], flops * 16 / out[1], rates
    packed = [(torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, w.shape, dtype=torch.int32, generator=g), 2),
               int4.group_size(w.shape[1]), torch.rand(w.shape[1] // int4.group_size(w.shape[1]), w.shape[0], 2,
                                                       generator=g).bfloat16()) for w in lin]
    xb = {w.shape[1]: torch.randn(16, w.shape[1]).bfloat16() for w in lin}
    t4 = timed(lambda: [torch._weight_int4pack_mm_for_cpu(xb[w.shape[1]], p, gs, sz)
                        for w, (p, gs, sz) in zip(lin, packed, strict=True)])
    rates["int4"] = lin_flops / t4
    return nbytes / out[0], flops * 16 / out[1], rates


def swap_baseline(zoo_experts: dict[str, Path], tokenizer, requests: int, new_tokens: int) -> dict:
    """One transformers model per expert, loaded from disk for each request that needs another expert."""
    from meswitch.model.checkpoint import load_checkpoint

    names = list(zoo_experts)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    t0, loads = time.perf_counter(), []
    for i in range(requests):
        tl = time.perf_counter()
        model, _ = load_checkpoint(zoo_experts[names[i % len(names)]])
        loads.append(time.perf_counter() - tl)
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        del model
    total = time.perf_counter() - t0
    return {"tokens_per_s": requests * new_tokens / total, "load_s_mean": sum(loads) / len(loads)}


def engine_traffic(engine, names: list[str], requests: int, new_tokens: int, together: bool) -> float:
    """Tokens/s for ``requests`` chat requests, each for the next expert, submitted at once or one by one."""
    from meswitch.engine import Request, SamplingParams

    p = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    reqs = [Request(messages=[{"role": "user", "content": PROMPT}], expert=names[i % len(names)], params=p)
            for i in range(requests)]
    t0 = time.perf_counter()
    if together:
        engine.generate(reqs)
    else:
        for r in reqs:
            engine.generate(r)
    return requests * new_tokens / (time.perf_counter() - t0)


def step_cost(case: str, batch: int, policy: dict, p_lin: int, p_head: int, delta_bytes: float,
              delta_params: int, n_exp: int) -> tuple[float, float, float]:
    """(weight bytes read, base FLOPs, delta FLOPs) of one decode step with fp32 base weights, from the
    path the engine takes (``backend``: the delta backend that ran).

    As ``ExpertLinear.forward`` does: a batch of one expert that has merged weights reads its own
    ``W_base + delta``; any other batch with expert rows reads the base once and adds each expert's
    delta in its resident form (packed codes and the low-bit layout: ``delta_bytes``, 3-bit codes
    taking 4-bit slots aside; int4: half a byte per weight) over its rows, as a fused kernel would:
    the bound such a kernel could reach, not what unpacking with torch ops costs. Merged weights are
    never read in a mixed batch. The delta FLOPs are counted apart: the delta kernels do them at
    their own rate (bf16 or int8 arithmetic), not fp32's. ``delta_bytes``: one expert's resident
    delta bytes; ``delta_params``: the multiply-adds of its delta per row (``p_lin`` for a full-rank
    delta, the factors' parameters for a LoRA expert).
    """
    nbytes, flops = 4 * p_head + 4 * p_lin, 2 * (p_head + p_lin) * batch  # the head, and one linear pass
    solo = case == "one" or (case == "lora16" and batch == 1)
    if case == "base" or (solo and policy["max_merged"] > 0):
        return nbytes, flops, 0.0
    segs = min(batch, 1 if case == "one" else n_exp)
    return nbytes + delta_bytes * segs, flops, 2 * delta_params * batch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path.home() / ".cache/meswitch/stores/full")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case and batch size, taken in turn")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--swap-requests", type=int, default=6)
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of " + ",".join(POLICIES))
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    policies = {p: POLICIES[p] for p in args.policies.split(",")}
    wanted = {"base", *args.cases.split(",")}
    if unknown := wanted - set(CASES):
        ap.error(f"unknown cases {sorted(unknown)}; expected some of {CASES}")

    import torch

    from meswitch.engine import Engine, EngineConfig
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.paths import cache_root
    from meswitch.store import DeltaStore

    torch.set_num_threads(args.threads)
    src = DeltaStore.open(args.store)
    store16, names16 = many_experts_store(src, 16, cache_root() / "stores" / "bench16")
    base, tok = load_checkpoint(Path(src.extra["base_path"]))
    adapters = cache_root() / "stores" / "lora16-adapters" / src.base["fingerprint"][:12]  # made on this base
    lora16 = lora_experts(store16, base, 16, adapters) if "lora16" in wanted else []
    p_all = sum(p.numel() for p in base.parameters())
    p_head = base.lm_head.weight.numel()
    p_lin = sum(m.weight.numel() for n, m in base.named_modules()
                if isinstance(m, torch.nn.Linear) and n != "lm_head")
    bw, gflops, kernel_rates = machine_limits(base)
    names3 = src.experts
    delta_bytes = sum(src.total_bytes(n) for n in names3) / len(names3)
    lora_bytes = store16.total_bytes(lora16[0]) if lora16 else 0  # the 16-bit factors (and a small header)

    results: dict = {"machine": machine(), "threads": args.threads, "steps": args.steps,
                     "bandwidth_gb_s": bw / 1e9, "gflops": gflops / 1e9,
                     "gflops_int4": kernel_rates["int4"] / 1e9 if "int4" in kernel_rates else None,
                     "gflops_lowbit": kernel_rates["lowbit"] / 1e9 if "lowbit" in kernel_rates else None,
                     "tokens_per_s": {}, "limits": {}, "backends": {},
                     "repeats": args.repeats, "samples": {}, "memory_bytes": {}, "load_ms": {}}
    cases = {"base": [None], "one": names16[:1], "mixed3": names16[:3], "mixed16": names16, "lora16": lora16}
    cases = {c: e for c, e in cases.items() if c in wanted}
    for policy, kw in policies.items():
        engine = Engine(store16, base, tok, EngineConfig(max_batch=16, **kw), check_base=False)
        backend = engine.backend_selection.backend.name
        results["backends"][policy] = engine.backend_selection.describe()
        print(f"[{policy}] {results['backends'][policy]}", file=sys.stderr, flush=True)
        run = {c: e for c, e in cases.items() if not (policy == "exact" and c in ("mixed16", "lora16"))}
        for b in BATCHES:
            for experts in run.values():
                decode_rate(engine, experts, b, WARMUP)  # loads and merges happen here, not in the timing
            samples: dict[str, list[float]] = {c: [] for c in run}
            for _ in range(args.repeats):  # every case in turn, so a shared machine's drift hits them alike
                for case, experts in run.items():
                    samples[case].append(decode_rate(engine, experts, b, args.steps))
            for case, experts in run.items():
                rate = statistics.median(samples[case])
                results["tokens_per_s"].setdefault(policy, {}).setdefault(case, {})[str(b)] = rate
                results["samples"].setdefault(policy, {}).setdefault(case, {})[str(b)] = samples[case]
                if case == "lora16":  # 16-bit factors, multiplied in float32
                    nb, fl, dfl = step_cost(case, b, kw, p_lin, p_head, lora_bytes, lora_bytes // 2, len(experts))
                    delta_rate = gflops
                else:
                    nb, fl, dfl = step_cost(case, b, kw, p_lin, p_head, 0.5 * p_lin if backend == "int4" else
                                            delta_bytes, p_lin, len(experts))
                    delta_rate = kernel_rates.get(backend, gflops)
                t_compute = fl / gflops + dfl / delta_rate
                limit = b / max(nb / bw, t_compute)
                results["limits"].setdefault(policy, {}).setdefault(case, {})[str(b)] = {
                    "bytes_read": nb, "flops": fl + dfl, "delta_flops": dfl, "limit_tokens_per_s": limit,
                    "achieved": rate / limit, "regime": "memory" if nb / bw > t_compute else "compute"}
                print(f"[{policy}] {case:8s} batch {b:2d}: {rate:7.1f} tok/s (median of "
                      f"{', '.join(f'{x:.1f}' for x in samples[case])})", file=sys.stderr, flush=True)
        snap = engine.pool.snapshot()
        results["load_ms"][policy] = {n: s["load_ms"] for n, s in snap["experts"].items() if s["load_ms"]}
        for n, st in snap["experts"].items():
            results.setdefault("merge_ms", {}).setdefault(n, []).extend(st["merge_ms"])
        del engine

    # resident memory: base weights + experts (compressed tier; the merged hot tier separately)
    full = 4 * p_all
    for n in (1, 3, 16):
        row = {"full_models": n * full}
        for label, backend in MEMORY.items():
            eng = Engine(store16, base, tok, EngineConfig(max_batch=1, max_merged=0, backend=backend),
                         check_base=False)
            for name in names16[:n]:
                eng.pool.pin(name)
            row[label] = full + eng.pool.resident_bytes()
            del eng
        row["engine"] = row["packed"]
        results["memory_bytes"][str(n)] = row

    refs = {n: src.expert_meta(n)["meta"].get("reference_path") for n in names3}  # absent: not made from checkpoints
    zoo_experts = {n: Path(p) for n, p in refs.items() if p}
    if len(zoo_experts) == len(refs) and all(p.is_dir() for p in zoo_experts.values()):
        results["swap"] = swap_baseline(zoo_experts, tok, args.swap_requests, 32)
        eng = Engine(store16, base, tok, EngineConfig(max_batch=16), check_base=False)
        engine_traffic(eng, names16, 16, 2, together=True)  # warm-up: every expert loaded once
        results["traffic"] = {
            "together": engine_traffic(eng, names16, 16, 32, together=True),
            "one_by_one": engine_traffic(eng, names16, args.swap_requests, 32, together=False),
        }
    out = results_dir() / "engine.json"
    out.write_text(json.dumps(results, indent=2))
    report(results)
    plot(results, results_dir() / "engine.png")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> None:
    print(f"# engine decode throughput ({r['machine']}, {r['threads']} threads; measured fp32 matmul over the "
          f"base's weights: {r['bandwidth_gb_s']:.1f} GB/s at batch 1, {r['gflops']:.1f} GFLOPS at batch 16; "
          f"delta kernels at batch 16: int4 {r.get('gflops_int4') or float('nan'):.1f} GFLOPS, "
          f"low-bit {r.get('gflops_lowbit') or float('nan'):.1f} GFLOPS)\n")
    for policy, cases in r["tokens_per_s"].items():
        print(f"## policy `{policy}`: tokens/s (ratio to the base at the same batch; achieved fraction of the "
              f"bytes/FLOPs limit)\n")
        print("| case | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
        print("|---|" + "---|" * len(BATCHES))
        for case, by_b in cases.items():
            cells = []
            for b in BATCHES:
                rate, base = by_b[str(b)], cases["base"][str(b)]
                lim = r["limits"][policy][case][str(b)]
                cells.append(f"{rate:.1f} ({rate / base:.2f}x; {lim['achieved']:.0%} of {lim['regime']} limit)")
            print(f"| {case} | " + " | ".join(cells) + " |")
        print()
    print("## resident memory: fp32 base + experts (packed codes; + the low-bit layout of the default policy; "
          "+ the int4 cache) vs as many full fp32 models\n")
    print("| experts | packed | ratio | packed + low-bit | ratio | packed + int4 | ratio | full models |\n"
          "|---|---|---|---|---|---|---|---|")
    for n, m in r["memory_bytes"].items():
        cells = [f"{m[k] / 2**20:.0f} MiB | {m['full_models'] / m[k]:.2f}x" for k in ("packed", "packed+lowbit", "packed+int4")]
        print(f"| {n} | " + " | ".join(cells) + f" | {m['full_models'] / 2**20:.0f} MiB |")
    loads = sorted(ms for v in r["load_ms"].values() for lst in v.values() for ms in lst)
    merges = sorted(ms for lst in r.get("merge_ms", {}).values() for ms in lst)
    if loads:
        print(f"\nexpert load from disk (verified): median {loads[len(loads) // 2]:.0f} ms over {len(loads)} loads")
    if merges:
        print(f"merge into hot weights: median {merges[len(merges) // 2]:.0f} ms over {len(merges)} merges")
    if "swap" in r:
        s, t = r["swap"], r["traffic"]
        print(f"\n## every request needs another expert (32 new tokens each)\n\n| system | tokens/s | ratio |\n|---|---|---|\n"
              f"| transformers, swap model from disk (load {s['load_s_mean']:.1f} s) | {s['tokens_per_s']:.1f} | 1.00x |\n"
              f"| meswitch, one request at a time | {t['one_by_one']:.1f} | {t['one_by_one'] / s['tokens_per_s']:.1f}x |\n"
              f"| meswitch, 16 requests for 16 experts batched | {t['together']:.1f} | "
              f"{t['together'] / s['tokens_per_s']:.1f}x |")


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(r["tokens_per_s"]), figsize=(3.6 * len(r["tokens_per_s"]), 4), sharey=True)
    for ax, (policy, cases) in zip(axes, r["tokens_per_s"].items(), strict=True):
        for case, by_b in cases.items():
            ax.plot(BATCHES, [by_b[str(b)] for b in BATCHES], marker="o", label=case)
        ax.set_title(f"policy: {policy}")
        ax.set_xlabel("batch size")
        ax.set_xticks(BATCHES)
    axes[0].set_ylabel("decode tokens/s")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
