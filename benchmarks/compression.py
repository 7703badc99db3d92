"""Compression methods side by side on the reference zoo: effective bits, fidelity, time, memory.

For every expert, on its own domain's held-out text: rtn at 1-4 bits (symmetric and asymmetric),
BitDelta (with and without scale distillation), the ME-Switch salient quantizer at 1-4 bits (with
and without distillation), and the default setting. Prints a table, writes JSON and two plots
(KL and perplexity ratio against effective bits per delta parameter).

    python benchmarks/compression.py [--zoo full|small] [--json] [--distill-steps N] [--limit N]
                                     [--settings rtn-2,salient-2,default ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakRSS, machine, results_dir  # noqa: E402


def settings(distill_steps: int) -> list[tuple[str, dict]]:
    """(label, CompressConfig overrides) for every measured point."""
    # The paper's baselines use the plain absmax grid (clip 1.0); only the default uses its own.
    out: list[tuple[str, dict]] = [(f"rtn-{b}", {"method": "rtn", "bits": b, "clip_ratio": 1.0}) for b in (1, 2, 3, 4)]
    out.append(("rtn-2-clip0.7", {"method": "rtn", "bits": 2, "clip_ratio": 0.7}))
    out.append(("rtn-asym-2", {"method": "rtn", "bits": 2, "symmetric": False, "clip_ratio": 1.0}))
    out.append(("bitdelta", {"method": "bitdelta"}))
    out.append(("bitdelta+distill", {"method": "bitdelta", "distill_steps": distill_steps}))
    out += [(f"salient-{b}", {"method": "salient", "bits": b, "target_bits": b + 0.25, "clip_ratio": 1.0})
            for b in (1, 2, 3, 4)]
    out.append(("sign2d-1", {"method": "sign2d", "target_bits": 1.05}))
    out.append(("sign2d-1@1.5", {"method": "sign2d", "target_bits": 1.5}))
    out.append(("sign2d-1@1.5+distill", {"method": "sign2d", "target_bits": 1.5, "distill_steps": distill_steps}))
    out.append(("mixed@1.5", {"method": "mixed", "target_bits": 1.5}))
    # ME-Switch at its best measured setting (meswitch's default before GPTQ): 2-bit salient within 2.1 bits
    out.append(("salient-2@2.1", {"method": "salient", "bits": 2, "target_bits": 2.1}))
    out += [(f"gptq-{b}", {"method": "gptq", "bits": b}) for b in (1, 2, 3)]
    out += [(f"gptq-mixed@{t}", {"method": "gptq-mixed", "target_bits": t, "distill_steps": 0}) for t in (1.25, 1.5)]
    out.append(("default", {}))
    return out


def method_of(label: str) -> str:
    if label == "default":
        return "default"
    base = label.split("-")[0].split("+")[0].split("@")[0]
    if label.startswith("gptq-mixed"):
        base = "gptq-mixed"
    if "asym" in label:
        base += "-asym"
    return base + ("+distill" if "distill" in label else "")


def run(zoo: str, distill_steps: int, limit: int, experts: list[str] | None,
        only: list[str] | None = None) -> dict:
    import torch

    from meswitch.compress.config import CompressConfig
    from meswitch.compress.pipeline import (
        ACT_SQ_METHODS,
        GPTQ_METHODS,
        compress_model,
        expert_act_sq,
        expert_hessians,
    )
    from meswitch.data.chat import padded_batches
    from meswitch.data.examples import read_jsonl
    from meswitch.errors import CacheError
    from meswitch.eval.fidelity import compare_to_states, reference_states
    from meswitch.model.checkpoint import load_checkpoint, verify_checkpoint
    from meswitch.zoo.build import ZooPaths, build_zoo, expert_calibration, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    paths = ZooPaths(zoo_dir(zoo))
    wanted = [n for n, _ in get_recipe(zoo).experts if not experts or n in experts]
    try:  # reuse what exists; build only when something the run needs is missing
        for p in [paths.base, *(paths.expert(n) for n in wanted)]:
            verify_checkpoint(p, deep=False)
    except CacheError:
        build_zoo(zoo)
    own = expert_calibration(zoo, paths)  # each expert calibrated on its own domain, as `compress --zoo` does
    base0, tok = load_checkpoint(paths.base)
    rows = []
    for name, domain in get_recipe(zoo).experts:
        if experts and name not in experts:
            continue
        expert, _ = load_checkpoint(paths.expert(name))
        held_out = read_jsonl(paths.split(domain, "test"))[:limit]
        states = reference_states(expert, padded_batches(held_out, tok, 512, 4))
        calib = read_jsonl(own[name])
        # statistics shared by the settings; their time is added to each setting that uses them
        t0 = time.perf_counter()
        act = expert_act_sq(expert, tok, calib, CompressConfig())
        act_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hess = expert_hessians(expert, tok, calib, CompressConfig()) if any(
            CompressConfig(**over).method in GPTQ_METHODS and (not only or label in only)
            for label, over in settings(distill_steps)) else None
        hess_s = time.perf_counter() - t0
        rungs: dict = {}  # the GPTQ ladder's encodings, shared by this expert's gptq-mixed settings
        encode_s = 0.0  # ... and the time the first of them took, charged to each later one too
        for label, over in settings(distill_steps):
            if only and label not in only:
                continue
            cfg = CompressConfig(**over)
            student = copy.deepcopy(base0)
            t0 = time.perf_counter()
            with PeakRSS() as mem:
                _, _, info = compress_model(student, expert, tok, calib, cfg,
                                            act_sq=act, hessians=hess, rung_cache=rungs)
            seconds = time.perf_counter() - t0
            if cfg.method == "gptq-mixed":  # the first one encoded the ladder; later ones reuse it
                if encode_s:
                    seconds += encode_s
                else:
                    encode_s = seconds
            seconds += hess_s if cfg.method in GPTQ_METHODS else act_s if cfg.method in ACT_SQ_METHODS else 0
            fid = compare_to_states(states, expert.get_output_embeddings(), student)
            nominal = (1 if cfg.method in ("bitdelta", "sign2d") else None if cfg.method in ("mixed", "gptq-mixed")
                       else cfg.bits)
            row = {"expert": name, "setting": label, "method": method_of(label), "bits": nominal,
                   "bits_per_param": info["bits_per_param"], "kl": fid.kl, "top1": fid.top1,
                   "ppl_ratio": fid.ppl_ratio, "tokens": fid.tokens, "compress_s": seconds,
                   "peak_rss_bytes": mem.peak, "ratio_vs_fp16": info["ratio_vs_fp16"]}
            rows.append(row)
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}),
                  file=sys.stderr, flush=True)
            del student
        del expert
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    base_bytes = sum(t.numel() * t.element_size() for t in base0.state_dict().values())
    return {"zoo": zoo, "machine": machine(), "distill_steps": distill_steps, "held_out_examples": limit,
            "base_fp32_bytes": base_bytes, "rows": rows}


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = sorted({r["expert"] for r in result["rows"]})
    fig, axes = plt.subplots(2, len(experts), figsize=(5 * len(experts), 8), squeeze=False)
    for j, e in enumerate(experts):
        rows = [r for r in result["rows"] if r["expert"] == e]
        for method in sorted({r["method"] for r in rows}):
            pts = sorted((r["bits_per_param"], r["kl"], r["ppl_ratio"]) for r in rows if r["method"] == method)
            marker = "*" if method == "default" else "o"
            size = 14 if method == "default" else 5
            axes[0][j].plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ms=size, label=method)
            axes[1][j].plot([p[0] for p in pts], [p[2] for p in pts], marker=marker, ms=size, label=method)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{e}: KL(expert || compressed)")
        axes[1][j].set_title(f"{e}: perplexity ratio")
        axes[1][j].axhline(1.0, color="grey", lw=0.5)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("effective bits per delta parameter")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"meswitch compression on the {result['zoo']} zoo ({result['machine']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"compression, {result['zoo']} zoo, held-out text of each expert's domain")
    for c in ("expert", "setting", "bits/param", "KL", "top-1", "ppl ratio", "vs fp16", "time s", "peak RSS"):
        t.add_column(c, justify="left" if c in ("expert", "setting") else "right")
    for r in result["rows"]:
        t.add_row(r["expert"], r["setting"], f"{r['bits_per_param']:.3f}", f"{r['kl']:.2e}", f"{r['top1']:.4f}",
                  f"{r['ppl_ratio']:.4f}", f"{r['ratio_vs_fp16']:.1f}x", f"{r['compress_s']:.1f}",
                  f"{r['peak_rss_bytes'] / 2**30:.2f} GiB")
    Console().print(t)


def markdown(result: dict) -> str:
    """The result as a Markdown table (docs/results/compression_<zoo>.md), Pareto-optimal rows in bold."""
    lines = [f"Compression on the {result['zoo']} zoo, {result['held_out_examples']} held-out examples of each "
             f"expert's own domain; {result['machine']}; distillation {result['distill_steps']} steps.", "",
             "| expert | setting | bits/param | KL | top-1 | ppl ratio | vs fp16 | time s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = [o for o in result["rows"] if o["expert"] == r["expert"]]
        pareto = not any(o["bits_per_param"] <= r["bits_per_param"] and o["kl"] < r["kl"] for o in same)
        name = f"**{r['setting']}**" if pareto else r["setting"]
        lines.append(f"| {r['expert']} | {name} | {r['bits_per_param']:.3f} | {r['kl']:.2e} | {r['top1']:.4f} | "
                     f"{r['ppl_ratio']:.4f} | {r['ratio_vs_fp16']:.1f}x | {r['compress_s']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=["full", "small"], default="full")
    ap.add_argument("--distill-steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=12, help="held-out examples per expert")
    ap.add_argument("--experts", nargs="*", help="subset of experts (default: all)")
    ap.add_argument("--settings", help="comma-separated subset of the settings (default: all of them)")
    ap.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    args = ap.parse_args()
    only = args.settings.split(",") if args.settings else None
    known = [label for label, _ in settings(args.distill_steps)]
    if only and (unknown := sorted(set(only) - set(known))):
        ap.error(f"unknown settings {unknown}; known: {', '.join(known)}")
    result = run(args.zoo, args.distill_steps, args.limit, args.experts, only)
    out = results_dir()
    path = out / f"compression_{args.zoo}.json"
    if args.experts and path.is_file():  # a partial run replaces only its experts' rows
        old = json.loads(path.read_text())
        result["rows"] = [r for r in old["rows"] if r["expert"] not in args.experts] + result["rows"]
    path.write_text(json.dumps(result, indent=2))
    (out / f"compression_{args.zoo}.md").write_text(markdown(result))
    plot(result, out / f"compression_{args.zoo}.png")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
    else:
        print_table(result)
        print(f"wrote {out / f'compression_{args.zoo}.json'} and {out / f'compression_{args.zoo}.png'}")


if __name__ == "__main__":
    main()
