"""docs/RESULTS.md from the benchmarks' JSON results: the machine, every table, four plots, projections.

Reads what the scripts in this folder wrote to docs/results/ (compression_full.json, engine.json,
router.json, load.json, ray_scale.json, scale.json, and bench_run.json from run_all.py), writes
docs/results/report_{fidelity,memory,throughput,router_confusion}.png and replaces docs/RESULTS.md.
A missing result gives its section a "not measured" line with the command that measures it.

    python benchmarks/report.py [--results DIR] [--out FILE] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import results_dir  # noqa: E402

from meswitch.eval.projection import (  # noqa: E402
    MODELS,
    GiB,
    base_bytes,
    expert_bytes,
    experts_that_fit,
    full_models_that_fit,
    store_bytes,
)
from meswitch.paths import cache_root  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAPER_RATIO_3 = 1.74  # ME-Switch (arXiv): three Mistral-7B experts, 1.74x smaller (ICLR submission: 2.04x)
PAPER_EXPERTS_A100 = 16  # ME-Switch: 16 Mistral-7B models on one A100 (80 GB)
BITDELTA_EXPERTS, BITDELTA_GB = 6, 30  # BitDelta: 6 Mistral-7B fine-tunes in 30 GB
CAPACITIES_GIB = (24, 48, 80)
PROJECTED_N = (3, 16, 100)
PLOTS = {"fidelity": "report_fidelity.png", "memory": "report_memory.png",
         "throughput": "report_throughput.png", "confusion": "report_router_confusion.png"}


# ---- inputs ------------------------------------------------------------------------------------

def load_results(d: Path) -> dict[str, Any]:
    """Every result file that exists, by name (``compression``, ``engine``, ``router``, ...)."""
    files = {"compression": "compression_full.json", "engine": "engine.json", "router": "router.json",
             "load": "load.json", "ray": "ray_scale.json", "run": "bench_run.json", "gpu": "gpu_sgmv.json",
             "kernels": "cpu_delta_kernels.json", "kernel_fidelity": "kernel_fidelity.json", "scale": "scale.json",
             "llamacpp": "llamacpp.json"}
    out = {}
    for key, name in files.items():
        p = d / name
        if p.is_file():
            try:
                out[key] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise SystemExit(f"{p} is not valid JSON ({e}); rerun its benchmark") from e
    return out


def machine_lines() -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem:.0f} GiB; GPU: {gpu}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} "
            f"{platform.release()}; meswitch commit `{commit}`",
            f"- Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


def store_summary(store: Path | None) -> dict | None:
    if store is None or not (store / "manifest.json").is_file():
        return None
    from meswitch.store.summary import summarize

    return summarize(store)


def measured_bits(res: dict, summary: dict | None) -> float | None:
    """The default setting's bits per parameter: from the store, else the compression benchmark."""
    if summary and summary["experts"]:
        bits = [e["bits_per_param"] for e in summary["experts"].values() if e["bits_per_param"]]
        if bits:
            return max(bits)
    rows = [r for r in res.get("compression", {}).get("rows", []) if r["setting"] == "default"]
    return max(r["bits_per_param"] for r in rows) if rows else None


# ---- tables ------------------------------------------------------------------------------------

def md_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def compression_by_setting(comp: dict) -> list[dict]:
    """One row per setting, averaged over experts (KL, top-1 mean; perplexity ratio worst)."""
    by: dict[str, list[dict]] = defaultdict(list)
    for r in comp["rows"]:
        by[r["setting"]].append(r)
    out = []
    for setting, rows in by.items():
        n = len(rows)
        out.append({"setting": setting, "method": rows[0]["method"], "experts": n,
                    "bits_per_param": sum(r["bits_per_param"] for r in rows) / n,
                    "kl": sum(r["kl"] for r in rows) / n, "top1": sum(r["top1"] for r in rows) / n,
                    "ppl_ratio_max": max(r["ppl_ratio"] for r in rows),
                    "ratio_vs_fp16": sum(r["ratio_vs_fp16"] for r in rows) / n,
                    "compress_s": sum(r["compress_s"] for r in rows) / n})
    return sorted(out, key=lambda r: (r["method"] == "default", r["bits_per_param"]))


def compression_section(comp: dict | None) -> list[str]:
    out = ["## Compression: fidelity against bits", ""]
    if not comp:
        return out + ["Not measured: `python benchmarks/compression.py`.", ""]
    experts = sorted({r["expert"] for r in comp["rows"]})
    out += [f"{comp['zoo']} zoo, experts {', '.join(experts)}; each on {comp['held_out_examples']} held-out "
            f"examples of its own domain, against the uncompressed expert. KL and top-1 are means over the "
            f"experts, the perplexity ratio is the worst expert's. `vs fp16`: the delta's fp16 size over its "
            f"compressed size. Methods are meswitch's own implementations, run here on the same experts.", ""]
    rows = [[r["setting"], r["method"], f"{r['bits_per_param']:.3f}", f"{r['kl']:.2e}", f"{r['top1']:.4f}",
             f"{r['ppl_ratio_max']:.4f}", f"{r['ratio_vs_fp16']:.1f}x", f"{r['compress_s']:.0f}"]
            for r in compression_by_setting(comp)]
    out += [md_table(["setting", "method", "bits/param", "KL", "top-1", "ppl ratio (worst)", "vs fp16",
                      "time s / expert"], rows), "",
            f"![fidelity against bits](results/{PLOTS['fidelity']})", "",
            "Peers' published figures, for orientation (their models and tasks, not ours): BitDelta 1 bit per "
            "delta parameter (>10x smaller deltas); DeltaZip Vicuna-7B delta 12.9 GB -> 1.3 GB (about 1.6 bits); "
            "Delta-CoMe 1/16 of the size at 53.2 vs 53.5 average score.", ""]
    return out


def footprint_lines(summary: dict | None) -> list[str]:
    if not summary:
        return []
    f = summary["footprint"]
    return [f"Stored footprint of the served store ({f['experts']} experts): base + compressed experts = "
            f"{f['store_bytes'] / 2**20:.1f} MiB vs {f['experts']} fp16 experts = "
            f"{f['fp16_experts_bytes'] / 2**20:.1f} MiB: **{f['ratio']:.2f}x smaller** "
            f"(ME-Switch paper: {PAPER_RATIO_3}x for three experts).", ""]


def _cache_key(engine: dict) -> tuple[str, str]:
    """The memory row key of the default policy's kernel cache, and its name (runs before the low-bit kernel: int4)."""
    rows = engine["memory_bytes"].values()
    if rows and all("packed+lowbit" in m for m in rows):
        return "packed+lowbit", "the codes in the low-bit kernel's layout (in place of the packed ones)"
    return "packed+int4", "the packed codes plus the int4 cache"


def memory_section(engine: dict | None, summary: dict | None, bits: float | None) -> list[str]:
    out = ["## Memory: experts against resident bytes", ""]
    out += footprint_lines(summary)
    if engine:
        rows = []
        key, name = _cache_key(engine)
        for n, m in engine["memory_bytes"].items():
            rows.append([n, f"{m['full_models'] / 2**20:.0f} MiB", f"{m['packed'] / 2**20:.0f} MiB",
                         f"{m['full_models'] / m['packed']:.2f}x", f"{m[key] / 2**20:.0f} MiB",
                         f"{m['full_models'] / m[key]:.2f}x"])
        out += ["Measured resident memory of the engine on this machine (fp32 base, as served on CPU): "
                f"packed codes only, and what the default policy keeps for fast mixed batches: {name}.", "",
                md_table(["experts", "full models", "meswitch packed", "ratio", "meswitch default", "ratio"], rows),
                ""]
    else:
        out += ["Engine memory not measured: `python benchmarks/engine.py`.", ""]
    if bits is None:
        return out + ["Projections need a measured bits per parameter: run `make demo` or the compression "
                      "benchmark.", ""]
    out += [f"![memory against experts](results/{PLOTS['memory']})", ""]
    return out + projection_section(bits)


def projection_section(bits: float) -> list[str]:
    out = [f"### Projection to real model sizes at the measured {bits:.3f} bits per parameter", "",
           "Weights only (KV cache and activations come on top); the base in 16 bit; every block's linear "
           "layers carry a delta at the measured rate and its norms a 16-bit delta; embeddings and lm_head are the base's (a fine-tune "
           "that changes them adds a 16-bit embedding delta, last column). Shapes from the models' "
           "published configs (`meswitch.eval.projection`); 1 GiB = 2^30 bytes.", ""]
    head = ["model", "params", "base", "per expert"] + [f"base + {n}" for n in PROJECTED_N] + \
        [f"fit in {c} GiB" for c in CAPACITIES_GIB] + ["full fp16 models in 80 GiB", "fit in 80 GiB (embedding deltas)"]
    rows = []
    for m in MODELS.values():
        rows.append([m.name, f"{m.params / 1e9:.2f} B", f"{base_bytes(m) / GiB:.1f} GiB",
                     f"{expert_bytes(m, bits) / GiB:.2f} GiB",
                     *[f"{store_bytes(m, n, bits) / GiB:.1f} GiB" for n in PROJECTED_N],
                     *[str(experts_that_fit(m, c * GiB, bits)) for c in CAPACITIES_GIB],
                     str(full_models_that_fit(m, 80 * GiB)),
                     str(experts_that_fit(m, 80 * GiB, bits, embedding_delta=True))])
    mistral = MODELS["Mistral-7B"]
    ours_80 = experts_that_fit(mistral, 80 * GiB, bits)
    ours_30 = experts_that_fit(mistral, BITDELTA_GB * GiB, bits)
    out += [md_table(head, rows), "",
            f"Against the peers on Mistral-7B: ME-Switch serves {PAPER_EXPERTS_A100} on one A100 (80 GB), "
            f"meswitch's measured rate fits **{ours_80}** experts beside the base in 80 GiB; BitDelta holds "
            f"{BITDELTA_EXPERTS} fine-tunes in {BITDELTA_GB} GB, meswitch fits **{ours_30}** in {BITDELTA_GB} GiB "
            f"(weights only for meswitch; the peers' figures include their serving overheads).", ""]
    return out


def engine_section(engine: dict | None) -> list[str]:
    out = ["## Engine: tokens/s against active experts", ""]
    if not engine:
        return out + ["Not measured: `python benchmarks/engine.py`.", ""]
    out += [f"Decode tokens/s ({engine['machine']}, {engine['threads']} threads), every case in one process; "
            "ratio to the base model alone at the same batch size. `one`: one expert; `mixed3`: the three "
            "zoo experts round-robin; `mixed16`: 16 experts in the batch.", ""]
    batches = sorted({int(b) for cases in engine["tokens_per_s"].values() for v in cases.values() for b in v})
    for policy, cases in engine["tokens_per_s"].items():
        rows = []
        for case, by_b in cases.items():
            cells = []
            for b in batches:
                rate, base = by_b.get(str(b)), cases["base"].get(str(b))
                cells.append(f"{rate:.1f} ({rate / base:.2f}x)" if rate and base else "-")
            rows.append([case, *cells])
        out += [f"Policy `{policy}`:", "", md_table(["case", *[f"batch {b}" for b in batches]], rows), ""]
    if "swap" in engine:
        s, t = engine["swap"], engine["traffic"]
        out += ["Every request needs another expert (the swap baseline: one transformers model per expert, "
                "loaded from disk when a request needs it):", "",
                md_table(["system", "tokens/s", "ratio"], [
                    [f"transformers, swap model from disk (load {s['load_s_mean']:.1f} s)", f"{s['tokens_per_s']:.1f}",
                     "1.00x"],
                    ["meswitch, one request at a time", f"{t['one_by_one']:.1f}",
                     f"{t['one_by_one'] / s['tokens_per_s']:.1f}x"],
                    ["meswitch, 16 requests for 16 experts batched", f"{t['together']:.1f}",
                     f"{t['together'] / s['tokens_per_s']:.1f}x"]]), ""]
    loads = sorted(ms for v in engine.get("load_ms", {}).values() for lst in v.values() for ms in lst)
    if loads:
        out += [f"Bringing an expert in from disk (verified): median {loads[len(loads) // 2]:.0f} ms over "
                f"{len(loads)} loads.", ""]
    return out + [f"![tokens/s against active experts](results/{PLOTS['throughput']})", ""]


def kernels_section(kernels: dict | None, fidelity: dict | None) -> list[str]:
    """The CPU delta kernels side by side (speed), and what their rounding costs against the exact path."""
    out = ["## Engine: the CPU delta kernels", ""]
    if kernels:
        keys = ("lowbit_1bit_ms", "lowbit_2bit_ms", "lowbit_3bit_ms", "lowbit_2bit_avx2_ms", "int4_ms")
        rows = [[n, *(f"{r[k]:.2f}" if k in r else "-" for k in keys), f"{r['int4_ms'] / r['lowbit_2bit_ms']:.2f}x"]
                for n, r in kernels["per_expert_rows"].items()]
        st = kernels["step_3_experts_batch_16"]
        out += [f"ms per expert over {kernels['layers']} layers of the zoo base's shapes, random codes "
                f"({kernels['machine']}, {kernels['threads']} threads): meswitch's low-bit kernel (VNNI int8 dot "
                "products) against PyTorch's int4 kernel.", "",
                md_table(["rows", "low-bit 1 bit", "2 bits", "3 bits", "2 bits, AVX2 build", "int4", "int4 / low-bit 2 bits"],
                         rows), "",
                f"One decode step's deltas for 3 experts at batch 16: low-bit {st['lowbit_2bit_ms']:.1f} ms (2 bits, "
                f"one call per layer), int4 {st['int4_ms']:.1f} ms (one call per expert): "
                f"{st['int4_ms'] / st['lowbit_2bit_ms']:.1f}x.", ""]
    else:
        out += ["Not measured: `python benchmarks/cpu_delta_kernels.py`.", ""]
    if fidelity:
        rows = [[c, n, s["positions"], f"{s['kl']:.2e}", f"{s['top1']:.4f}", f"{s['max_abs_logit']:.3f}"]
                for c, by in fidelity["caches"].items() for n, s in by.items()]
        out += [f"Against the exact path ({fidelity['reference']}), teacher-forced on {fidelity['examples']} held-out "
                "examples of each expert's domain, every expert in one mixed batch:", "",
                md_table(["kernel", "expert", "positions", "mean KL", "top-1 agreement", "max abs logit diff"], rows), ""]
    else:
        out += ["Not measured: `python benchmarks/kernel_fidelity.py`.", ""]
    return out


def gpu_section(gpu: dict | None) -> list[str]:
    """The Triton kernel's measurements from a lent GPU (``benchmarks/gpu_sgmv.py``; not part of ``make bench``)."""
    out = ["## Engine on a GPU: the Triton multi-expert kernel", ""]
    if not gpu or not isinstance(gpu.get("layers"), list) or not isinstance(gpu.get("decode"), list):
        return out + ["Not measured: `python benchmarks/gpu_sgmv.py`. (On a CUDA machine, with "
                      "`--json docs/results/gpu_sgmv.json`.)", ""]
    out += [f"{gpu['device']}, torch {gpu['torch']}; random weights in the Llama-3-8B shape, bf16 base, 16 "
            "experts at 1.5 bits on average. " + gpu.get("note", ""), ""]
    if isinstance(gpu.get("check"), list):
        worst = max(r["rel_err"] for r in gpu["check"] if r["y"] == "float32")
        out += [f"Correctness: {len(gpu['check'])} checks against the float32 reference, worst relative error "
                f"{worst:.1e} with a float32 output.", ""]
    out += ["One decoder block, GPU time (CUDA-graph replays):", "", md_table(
        ["batch", "experts", "ms", "ratio to the base", "bytes-read bound", "GB/s"],
        [[r["batch"], r["experts"] or "base", f"{r['ms']:.3f}", f"{r['ratio']:.3f}x",
          f"{r['bound_ratio']:.2f}x" if "bound_ratio" in r else "-", f"{r['GBps']:.0f}"] for r in gpu["layers"]]), ""]
    out += ["Engine decode (`ServingModel`), tokens/s and ratio to the base at the same batch:", "", md_table(
        ["batch", "case", "tokens/s", "ratio"],
        [[r["batch"], r["case"], f"{r['tok_s']:.1f}", f"{r['ratio']:.2f}x"] for r in gpu["decode"]]), ""]
    return out


def router_rows(router: list[dict]) -> list[list[str]]:
    rows = []
    for r in router:
        i, o = r["id"], r["oos_all"]
        mem = (f"{r['encoder_bytes'] / 2**20:.0f} MiB + {r['head_bytes'] / 2**10:.0f} KiB head"
               if r.get("encoder_bytes") else f"base (shared) + {r['head_bytes'] / 2**10:.1f} KiB")
        rows.append([r["encoder"], f"{i['accuracy']:.3f}", f"{o['accuracy']:.3f}",
                     f"{i['ece']:.3f}", f"{o['ece']:.3f}", f"{o['fallback_rate']:.3f}",
                     f"{i['latency_ms_p50']:.1f}", f"{i['latency_ms_p99']:.1f}", mem])
    return rows


def router_section(router: list[dict] | None) -> list[str]:
    out = ["## Router: which expert", ""]
    if not router:
        return out + ["Not measured: `python benchmarks/router.py`.", ""]
    out += ["ID: the zoo's held-out split. OOS: out-of-source sets no training mix uses (competition math, "
            "docstring stubs, prose code requests, general requests with formatting constraints); macro "
            "accuracy over the domains. Latency per query at batch 1.", "",
            md_table(["encoder", "ID acc", "OOS acc (macro)", "ECE ID", "ECE OOS", "fallback OOS", "p50 ms",
                      "p99 ms", "memory"], router_rows(router)), ""]
    sets = router[0].get("oos", {})
    if sets:
        out += ["Per out-of-source set:", "",
                md_table(["encoder", *sets], [[r["encoder"], *[f"{r['oos'][s]['accuracy']:.3f}" for s in sets]]
                                               for r in router]), ""]
    return out + [f"![router confusion matrices](results/{PLOTS['confusion']})", ""]


def load_section(load: dict | None) -> list[str]:
    out = ["## Server under load", ""]
    if not load:
        return out + ["Not measured: `python benchmarks/load.py`.", ""]
    who = "`model=\"auto\"` (routed)" if load.get("routed") else "experts named by domain"
    routed_ok = sum(d.get("routed_to_own_expert", 0) for d in load.get("by_domain", {}).values())
    rows = [[load["clients"], f"{load['seconds']:.0f}", load["max_tokens"], load["completed"], load["errors"],
             f"{load['ttft_p50_s']:.2f} / {load['ttft_p99_s']:.2f}", f"{load['latency_p50_s']:.1f} / "
             f"{load['latency_p99_s']:.1f}", f"{load['tokens_per_s']:.1f}", f"{routed_ok}/{load['completed']}"]]
    return out + [f"Streaming clients with the official `openai` package against `meswitch serve`, {who}; "
                  f"{load.get('machine', '')}.", "",
                  md_table(["clients", "seconds", "max tokens", "completed", "errors", "TTFT p50 / p99 s",
                            "latency p50 / p99 s", "tokens/s", "answered by its domain's expert"], rows), ""]


def ray_section(ray: dict | None, results: Path) -> list[str]:
    out = ["## Ray Serve scale-out", ""]
    if not ray:
        return out + ["Not measured: `python benchmarks/ray_scale.py`.", ""]
    md = results / "ray_scale.md"  # the benchmark's own tables, written beside its JSON
    if md.is_file():
        body = [line for line in md.read_text().splitlines() if not line.startswith("# ")]
        return out + body + [""]
    rows = [[t["replicas"], t.get("torch_threads", "-"), t["completed"], t["errors"], f"{t['tokens_per_s']:.1f}",
             f"{t['ratio_vs_1_replica']:.2f}x"] for t in ray.get("throughput", [])]
    return out + [md_table(["replicas", "torch threads", "completed", "errors", "tokens/s", "vs 1 replica"], rows), ""]


def scale_section(scale: dict | None, results: Path) -> list[str]:
    out = ["## Thousands of experts", ""]
    if not scale:
        return out + ["Not measured: `python benchmarks/scale.py`.", ""]
    md = results / "scale.md"  # the benchmark's own table, written beside its JSON
    body = [line for line in md.read_text().splitlines() if not line.startswith("# ")] if md.is_file() else []
    while body and not body[0].strip():  # the blank line under the benchmark's own title
        body.pop(0)
    plot = ["", "![scale](results/scale.png)"] if (results / "scale.png").is_file() else []
    return out + body + plot + [""]


def llamacpp_section(llamacpp: dict | None, results: Path) -> list[str]:
    out = ["## Against llama.cpp on the same GGUF", ""]
    if not llamacpp:
        return out + ["Not measured: `make llamacpp`, then `python benchmarks/llamacpp.py`.", ""]
    out += ["`meswitch base` serves the GGUF's own Q4_1/Q8_0 blocks (the default, `base_weights=\"auto\"`); "
            '`meswitch base fp32` the same weights dequantized (`base_weights="dense"`).', ""]
    md = results / "llamacpp.md"  # the benchmark's own tables, written beside its JSON
    body = md.read_text().splitlines() if md.is_file() else []
    plot = ["", "![llamacpp](results/llamacpp.png)"] if (results / "llamacpp.png").is_file() else []
    return out + body + plot + [""]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def headline(res: dict, summary: dict | None, bits: float | None) -> list[str]:
    rows: list[list[str]] = []
    if summary:
        f = summary["footprint"]
        # The benchmark's default row (more held-out text) is quoted before the store's own check.
        comp = res.get("compression")
        default = [r for r in compression_by_setting(comp) if r["setting"] == "default"] if comp else []
        fid = [e["fidelity"] for e in summary["experts"].values() if e["fidelity"]]
        worst_ppl = (default[0]["ppl_ratio_max"] if default
                     else max((x.get("ppl_ratio", 0) for x in fid), default=None))
        rows.append(["footprint, base + 3 experts vs 3 fp16 experts", f"{f['ratio']:.2f}x smaller at "
                     f"{bits:.3f} bits/param" + (f", worst ppl ratio {worst_ppl:.4f}" if worst_ppl else ""),
                     f"ME-Switch {PAPER_RATIO_3}x (2.04x ICLR), \"nearly lossless\""])
    if bits:
        m = MODELS["Mistral-7B"]
        rows.append(["Mistral-7B experts in 80 GiB (weights)", str(experts_that_fit(m, 80 * GiB, bits)),
                     f"ME-Switch {PAPER_EXPERTS_A100} on an A100"])
        rows.append([f"Mistral-7B experts in {BITDELTA_GB} GiB (weights)", str(experts_that_fit(m, BITDELTA_GB * GiB, bits)),
                     f"BitDelta {BITDELTA_EXPERTS} in {BITDELTA_GB} GB"])
    eng = res.get("engine")
    if eng:
        tps = eng["tokens_per_s"]["default"]
        big = max(tps["base"], key=int)
        if "mixed16" in tps:
            rows.append([f"decode, 16 experts in one batch of {big}, vs the base alone",
                         f"{tps['mixed16'][big] / tps['base'][big]:.2f}x the base's tokens/s",
                         "LoRA servers: 30-60% drop reported by users"])
        if "swap" in eng:
            rows.append(["16 requests for 16 experts vs swapping models from disk",
                         f"{eng['traffic']['together'] / eng['swap']['tokens_per_s']:.1f}x tokens/s", "-"])
    router = res.get("router")
    if router:
        r = router[0]
        rows.append([f"router ({r['encoder']}) accuracy in-distribution / out-of-source",
                     f"{r['id']['accuracy']:.3f} / {r['oos_all']['accuracy']:.3f}, p50 "
                     f"{r['id']['latency_ms_p50']:.1f} ms", "RouteLLM: two models only"])
    if not rows:
        return []
    return ["## Headline", "", md_table(["measure", "meswitch (this machine)", "peers (published)"], rows), ""]


# ---- plots -------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fidelity(comp: dict, path: Path) -> None:
    plt = _plt()
    rows = compression_by_setting(comp)
    fig, (ax_kl, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["bits_per_param"], r["kl"], r["ppl_ratio_max"]) for r in rows if r["method"] == method)
        style = {"marker": "*", "ms": 14, "ls": "none"} if method == "default" else {"marker": "o", "ms": 5}
        ax_kl.plot([p[0] for p in pts], [p[1] for p in pts], label=method, **style)
        ax_ppl.plot([p[0] for p in pts], [p[2] for p in pts], label=method, **style)
    ax_kl.set(yscale="log", title="KL(expert || compressed), mean over experts",
              xlabel="effective bits per delta parameter")
    ax_ppl.set(title="perplexity ratio, worst expert", xlabel="effective bits per delta parameter")
    ax_ppl.axhline(1.0, color="grey", lw=0.5)
    for ax in (ax_kl, ax_ppl):
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(engine: dict | None, bits: float, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if engine else 1, figsize=(12 if engine else 6, 4.5), squeeze=False)
    if engine:
        ax = axes[0][0]
        mem = engine["memory_bytes"]
        ns = sorted(int(n) for n in mem)
        cache, name = _cache_key(engine)
        for key, label in (("full_models", "full models"), ("packed", "meswitch (packed)"),
                           (cache, "meswitch (default policy)")):
            ax.plot(ns, [mem[str(n)][key] / 2**20 for n in ns], marker="o", label=label)
        if 3 in ns:
            ax.plot([3], [mem["3"]["full_models"] / PAPER_RATIO_3 / 2**20], "k*", ms=12,
                    label=f"ME-Switch claim: {PAPER_RATIO_3}x smaller at 3")
        ax.set(title="measured on the zoo (resident, fp32 base)", xlabel="experts", ylabel="MiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[0][-1]
    m = MODELS["Mistral-7B"]
    ns = list(range(0, 101))
    ax.plot(ns, [store_bytes(m, n, bits) / GiB for n in ns], label=f"meswitch at {bits:.2f} bits/param")
    ax.plot(ns, [max(n, 1) * base_bytes(m) / GiB for n in ns], label="full fp16 models")
    for c in CAPACITIES_GIB:
        ax.axhline(c, color="grey", lw=0.6, ls="--")
        ax.text(100, c, f"{c} GiB", va="bottom", ha="right", fontsize=8)
    ax.plot([PAPER_EXPERTS_A100], [80], "k*", ms=12, label=f"ME-Switch: {PAPER_EXPERTS_A100} on an A100")
    ax.plot([BITDELTA_EXPERTS], [BITDELTA_GB], "rs", ms=8, label=f"BitDelta: {BITDELTA_EXPERTS} in {BITDELTA_GB} GB")
    ax.set(title="projected: Mistral-7B, weights", xlabel="experts", ylabel="GiB", ylim=(0, 200))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(engine: dict, path: Path) -> None:
    plt = _plt()
    active = {"base": 0, "one": 1, "mixed3": 3, "mixed16": 16}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, cases in engine["tokens_per_s"].items():
        if policy == "exact":
            continue
        batches = sorted({int(b) for v in cases.values() for b in v})
        for b in batches:
            pts = sorted((active[c], v[str(b)]) for c, v in cases.items() if c in active and str(b) in v)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if policy == "default" else ":",
                    label=f"batch {b} ({policy})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, 1, 3, 16], ["base", "1", "3", "16"])
    ax.set(xlabel="distinct experts in the batch", ylabel="decode tokens/s",
           title=f"decode throughput ({engine['machine']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(router: list[dict], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(router), figsize=(4.2 * len(router), 4), squeeze=False)
    for ax, r in zip(axes[0], router, strict=True):
        conf = r["oos_all"]["confusion"]
        labels = sorted({k for k in conf} | {p for row in conf.values() for p in row})
        mat = [[conf.get(t, {}).get(p, 0) for p in labels] for t in labels]
        totals = [max(sum(row), 1) for row in mat]
        norm = [[c / t for c in row] for row, t in zip(mat, totals, strict=True)]
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(mat):
            for j, c in enumerate(row):
                ax.text(j, i, str(c), ha="center", va="center", color="white" if norm[i][j] > 0.6 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_yticks(range(len(labels)), labels)
        ax.set(title=f"{r['encoder']}: out-of-source (acc {r['oos_all']['accuracy']:.3f})", xlabel="predicted",
               ylabel="true domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the report --------------------------------------------------------------------------------

def run_lines(run: dict | None) -> list[str]:
    if not run:
        return []
    rows = [[s["name"], s["status"], f"{s['seconds']:.0f}", s.get("finished", "-"),
             f"{s['load_avg']:.1f}" if "load_avg" in s else "-", f"`{s['command']}`"] for s in run["steps"]]
    total = sum(s["seconds"] for s in run["steps"])
    return ["### How this report was made", "",
            f"`make bench`: {total / 60:.1f} min of benchmarks (the steps' own times, summed). `load`: the "
            f"1-minute load average as the step ended; above {os.cpu_count()} (the cores), other work shared "
            "the machine and its timings are pessimistic.", "",
            md_table(["benchmark", "status", "seconds", "finished", "load", "command"], rows), ""]


def build_report(res: dict, results: Path, summary: dict | None) -> str:
    """The Markdown text of docs/RESULTS.md; writes the plots into ``results`` as a side effect."""
    bits = measured_bits(res, summary)
    if res.get("compression"):
        plot_fidelity(res["compression"], results / PLOTS["fidelity"])
    if bits is not None:
        plot_memory(res.get("engine"), bits, results / PLOTS["memory"])
    if res.get("engine"):
        plot_throughput(res["engine"], results / PLOTS["throughput"])
    if res.get("router"):
        plot_confusion(res["router"], results / PLOTS["confusion"])
    lines = ["# meswitch results", "",
             "Written by `make bench` (`benchmarks/run_all.py`, then `benchmarks/report.py`); rerunning replaces "
             "this file and its plots. Every figure below was measured on this machine by the scripts in "
             "`benchmarks/`, except the peers' figures, which are their own published numbers "
             "(`../shared/docs/PAPER.md`).", "", "## Machine", "", *machine_lines(), ""]
    lines += run_lines(res.get("run"))
    lines += headline(res, summary, bits)
    lines += compression_section(res.get("compression"))
    lines += memory_section(res.get("engine"), summary, bits)
    lines += engine_section(res.get("engine"))
    lines += kernels_section(res.get("kernels"), res.get("kernel_fidelity"))
    lines += gpu_section(res.get("gpu"))
    lines += router_section(res.get("router"))
    lines += load_section(res.get("load"))
    lines += ray_section(res.get("ray"), results)
    lines += scale_section(res.get("scale"), results)
    lines += llamacpp_section(res.get("llamacpp"), results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=results_dir(), help="where the benchmarks wrote their JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    ap.add_argument("--store", type=Path, default=cache_root() / "stores" / "full",
                    help="the served store, for its stored footprint and bits per parameter")
    args = ap.parse_args(argv)
    res = load_results(args.results)
    text = build_report(res, args.results, store_summary(args.store))
    tasks = args.results / "tasks.md"  # benchmarks/tasks.py's table: kept between its markers
    if tasks.is_file():
        text += f"\n<!-- tasks:begin -->\n{tasks.read_text().strip()}\n<!-- tasks:end -->\n"
    from meswitch.utils.atomic import atomic_write_text

    atomic_write_text(args.out, text)
    print(f"wrote {args.out} ({len(text.splitlines())} lines) and its plots in {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
