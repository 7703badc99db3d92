"""Low-rank storage of full fine-tunes against the quantized forms, at equal bytes.

For every expert of a reference zoo: ``lowrank`` (each linear delta's truncated SVD in fp16 factors) at
the ranks whose bytes are 1, 2, 3 (and 0.25, 0.5, 4, 6, 8) bits per delta parameter, against rtn and gptq at
1, 2, 3 bits and ``gptq-mixed@1.5`` (the default without its distillation; lowrank has none either).
Fidelity as ``benchmarks/compression.py`` measures it (KL, top-1 agreement and perplexity ratio against
the uncompressed expert on its own domain's held-out text), the weight-space error of the stored
deltas, and each delta's singular value spectrum (the energy a rank captures). Prints two tables,
writes ``docs/results/lowrank.json`` and ``docs/results/lowrank.png``.

    python benchmarks/lowrank.py [--zoo small|full] [--limit N] [--experts math ...] [--settings a,b] [--json]
    python benchmarks/lowrank.py --from-json docs/results/lowrank.json   # tables and plot again, no measuring

For each quantized setting the table also gives the bits per parameter lowrank needs for the same KL
(interpolated between its measured budgets) and that size over the quantized one: above 1x, the
quantized form is smaller at equal fidelity.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, results_dir  # noqa: E402
from compression import settings as compression_settings  # noqa: E402

LOWRANK_BITS = (0.25, 0.5, 1, 2, 3, 4, 6, 8)  # budgets (bits per parameter) lowrank is measured at
QUANTIZED = ("rtn-1", "rtn-2", "rtn-3", "gptq-1", "gptq-2", "gptq-3", "gptq-mixed@1.5")
SPECTRUM_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # ranks, as shares of min(out, in)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def settings() -> list[tuple[str, dict]]:
    """(label, CompressConfig overrides): lowrank at each budget, then the quantized forms as
    ``benchmarks/compression.py`` defines them."""
    quantized = dict(compression_settings(0))
    low = [(f"lowrank@{b}", {"method": "lowrank", "bits": 16, "target_bits": float(b)}) for b in LOWRANK_BITS]
    return low + [(label, quantized[label]) for label in QUANTIZED]


def family(label: str) -> str:
    """The curve a setting belongs to: ``lowrank``, ``rtn``, ``gptq`` or ``gptq-mixed``."""
    if label.startswith("gptq-mixed"):
        return "gptq-mixed"
    return label.split("-")[0].split("@")[0]


def layer_deltas(base: Any, expert: Any) -> dict[str, Any]:
    """``{linear name: delta [out, in] float32}`` of every decoder linear layer (lm_head excluded)."""
    from meswitch.compress.calib import linear_names

    b, e = base.state_dict(), expert.state_dict()
    return {n: (e[f"{n}.weight"] - b[f"{n}.weight"]).float() for n in linear_names(expert)}


def energy_at(s2_cumsum: Any, rank: int) -> float:
    """Share of ``||delta||_F^2`` the best rank-``rank`` approximation keeps (``s2_cumsum``: cumulative ``s^2``)."""
    return float(s2_cumsum[rank - 1] / s2_cumsum[-1]) if rank > 0 else 0.0


def spectrum(deltas: dict[str, Any]) -> dict[str, Any]:
    """The singular value spectrum of an expert's deltas, per projection kind and overall.

    ``bits``: energy captured (summed over the layers, as a share of their total ``||delta||_F^2``) at
    the rank :meth:`CompressConfig.layer_rank` gives for each budget of :data:`LOWRANK_BITS`;
    ``fractions``: the same at ranks that are shares of ``min(out, in)``; ``rank90``/``rank50``: the
    mean share of ``min(out, in)`` needed for 90% / 50% of a layer's energy.
    """
    import torch

    from meswitch.compress.config import CompressConfig

    acc: dict[str, dict[str, Any]] = {}
    for name, d in deltas.items():
        kind = next((p for p in PROJECTIONS if name.endswith(p)), "other")
        s2 = torch.linalg.svdvals(d).double() ** 2
        cum = s2.cumsum(0)
        full = len(s2)
        total = float(cum[-1])
        rows = ["all", kind]
        for key in rows:
            a = acc.setdefault(key, {"total": 0.0, "bits": {b: 0.0 for b in LOWRANK_BITS},
                                     "fractions": {f: 0.0 for f in SPECTRUM_FRACTIONS}, "rank90": [], "rank50": [],
                                     "layers": 0})
            a["total"] += total
            a["layers"] += 1
            for b in LOWRANK_BITS:
                r = CompressConfig(method="lowrank", target_bits=float(b)).layer_rank(*d.shape)
                a["bits"][b] += energy_at(cum, r) * total
            for f in SPECTRUM_FRACTIONS:
                a["fractions"][f] += energy_at(cum, max(1, round(f * full))) * total
            for q, key90 in ((0.9, "rank90"), (0.5, "rank50")):
                a[key90].append((int(torch.searchsorted(cum / total, q)) + 1) / full)
    return {k: {"layers": a["layers"],
                "energy_at_bits": {str(b): v / a["total"] for b, v in a["bits"].items()},
                "energy_at_fraction": {str(f): v / a["total"] for f, v in a["fractions"].items()},
                "rank90_share": sum(a["rank90"]) / len(a["rank90"]),
                "rank50_share": sum(a["rank50"]) / len(a["rank50"])}
            for k, a in acc.items()}


def weight_error(deltas: dict[str, Any], base: Any, student: Any) -> float:
    """``||delta - stored||_F / ||delta||_F`` over every linear layer: ``student`` is base + the stored deltas."""
    b, s = base.state_dict(), student.state_dict()
    err = ref = 0.0
    for n, d in deltas.items():
        stored = s[f"{n}.weight"].float() - b[f"{n}.weight"].float()
        err += float((d - stored).double().pow(2).sum())
        ref += float(d.double().pow(2).sum())
    return math.sqrt(err / ref)


def measure_expert(name: str, domain: str, paths: Any, own: dict, base0: Any, tok: Any, limit: int,
                   only: list[str] | None) -> tuple[list[dict], dict]:
    """Every setting of one expert: (rows, spectrum)."""
    from meswitch.compress.config import CompressConfig
    from meswitch.compress.pipeline import GPTQ_METHODS, compress_model, expert_hessians
    from meswitch.data.chat import padded_batches
    from meswitch.data.examples import read_jsonl
    from meswitch.eval.fidelity import compare_to_states, reference_states
    from meswitch.model.checkpoint import load_checkpoint

    expert, _ = load_checkpoint(paths.expert(name))
    deltas = layer_deltas(base0, expert)
    spec = spectrum(deltas)
    states = reference_states(expert, padded_batches(read_jsonl(paths.split(domain, "test"))[:limit], tok, 512, 4))
    calib = read_jsonl(own[name])
    chosen = [(label, over) for label, over in settings() if not only or label in only]
    t0 = time.perf_counter()
    needs_h = any(CompressConfig(**over).method in GPTQ_METHODS for _, over in chosen)
    hess = expert_hessians(expert, tok, calib, CompressConfig()) if needs_h else None
    hess_s = time.perf_counter() - t0
    rows, rungs = [], {}
    for label, over in chosen:
        cfg = CompressConfig(**over)
        student = copy.deepcopy(base0)
        t0 = time.perf_counter()
        _, meta, info = compress_model(student, expert, tok, calib, cfg, hessians=hess, rung_cache=rungs)
        seconds = time.perf_counter() - t0 + (hess_s if cfg.method in GPTQ_METHODS else 0.0)
        fid = compare_to_states(states, expert.get_output_embeddings(), student)
        ranks = [m["rank"] for m in meta.values() if m.get("svd")]
        row = {"expert": name, "setting": label, "family": family(label), "bits_per_param": info["bits_per_param"],
               "kl": fid.kl, "top1": fid.top1, "ppl_ratio": fid.ppl_ratio, "tokens": fid.tokens,
               "weight_rel_err": weight_error(deltas, base0, student), "compress_s": seconds,
               "ratio_vs_fp16": info["ratio_vs_fp16"],
               "ranks": {"min": min(ranks), "max": max(ranks)} if ranks else None}
        rows.append(row)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}),
              file=sys.stderr, flush=True)
        del student
    return rows, spec


def run(zoo: str, limit: int, experts: list[str] | None, only: list[str] | None) -> dict:
    from meswitch.errors import CacheError
    from meswitch.model.checkpoint import load_checkpoint, verify_checkpoint
    from meswitch.zoo.build import ZooPaths, build_zoo, expert_calibration, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    paths = ZooPaths(zoo_dir(zoo))
    wanted = [(n, d) for n, d in get_recipe(zoo).experts if not experts or n in experts]
    try:  # reuse what exists; build only when something the run needs is missing
        for p in [paths.base, *(paths.expert(n) for n, _ in wanted)]:
            verify_checkpoint(p, deep=False)
    except CacheError:
        build_zoo(zoo)
    own = expert_calibration(zoo, paths)  # each expert calibrated on its own domain, as `compress --zoo` does
    base0, tok = load_checkpoint(paths.base)
    rows, spectra = [], {}
    for name, domain in wanted:
        r, spectra[name] = measure_expert(name, domain, paths, own, base0, tok, limit, only)
        rows += r
    return {"zoo": zoo, "machine": machine(), "held_out_examples": limit, "lowrank_bits": list(LOWRANK_BITS),
            "rows": rows, "spectrum": spectra}


def lowrank_bits_at(rows: list[dict], expert: str, kl: float) -> tuple[float, str] | None:
    """(bits per parameter, bound) lowrank needs for ``kl`` on ``expert``: log-KL interpolated linearly in bits
    between the measured lowrank points (bound ``=``); past them, the nearest budget measured with ``<=``
    (lowrank's smallest budget is already as good) or ``>`` (its largest is not); None without lowrank rows."""
    pts = sorted((r["bits_per_param"], math.log(r["kl"])) for r in rows
                 if r["expert"] == expert and r["family"] == "lowrank" and r["kl"] > 0)
    if not pts:
        return None
    target = math.log(kl)
    if target >= pts[0][1]:
        return pts[0][0], "<="
    for (b0, k0), (b1, k1) in zip(pts, pts[1:], strict=False):
        if k1 <= target <= k0:
            return (b0 + (b1 - b0) * (k0 - target) / (k0 - k1) if k0 != k1 else b0), "="
    return pts[-1][0], ">"


def add_equal_kl(result: dict) -> None:
    """Each quantized row's ``lowrank_same_kl``: ``{"bits", "bound", "size_ratio"}`` (lowrank's bytes over its
    own, at the same KL; a bound as :func:`lowrank_bits_at` gives it)."""
    for r in result["rows"]:
        if r["family"] == "lowrank":
            continue
        found = lowrank_bits_at(result["rows"], r["expert"], r["kl"])
        r["lowrank_same_kl"] = None if found is None else {
            "bits": found[0], "bound": found[1], "size_ratio": found[0] / r["bits_per_param"]}


def plot(result: dict, out: Path) -> None:
    """KL and perplexity ratio against bits per parameter (lowrank vs quantized), and the spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = list(dict.fromkeys(r["expert"] for r in result["rows"]))
    fig, axes = plt.subplots(3, len(experts), figsize=(5 * len(experts), 12), squeeze=False)
    styles = {"lowrank": ("tab:red", "s"), "rtn": ("tab:grey", "o"), "gptq": ("tab:blue", "o"),
              "gptq-mixed": ("tab:green", "*")}
    for j, e in enumerate(experts):
        rows = [r for r in result["rows"] if r["expert"] == e]
        for fam, (color, marker) in styles.items():
            pts = sorted((r["bits_per_param"], r["kl"], r["ppl_ratio"]) for r in rows if r["family"] == fam)
            if not pts:
                continue
            for i, key in ((0, 1), (1, 2)):
                axes[i][j].plot([p[0] for p in pts], [p[key] for p in pts], marker=marker, color=color,
                                ms=12 if marker == "*" else 5, label=fam)
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{e}: KL(expert || compressed)")
        axes[1][j].set_title(f"{e}: perplexity ratio")
        axes[1][j].axhline(1.0, color="grey", lw=0.5)
        for i in (0, 1):
            axes[i][j].set_xlabel("bits per delta parameter (every stored byte)")
            axes[i][j].grid(alpha=0.3)
        spec = result["spectrum"].get(e, {})
        for kind, s in spec.items():
            fr = sorted((float(f), v) for f, v in s["energy_at_fraction"].items())
            axes[2][j].plot([f for f, _ in fr], [v for _, v in fr], marker=".", lw=2.5 if kind == "all" else 1,
                            color="black" if kind == "all" else None, label=kind)
        axes[2][j].plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        axes[2][j].set_title(f"{e}: energy of the delta captured by rank r")
        axes[2][j].set_xlabel("r / min(out, in)")
        axes[2][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    axes[2][0].legend(fontsize=7)
    fig.suptitle(f"low rank vs quantized deltas, {result['zoo']} zoo")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def same_kl(row: dict) -> str:
    """``lowrank_same_kl`` of a quantized row for the table: bits and lowrank's size over the row's."""
    s = row.get("lowrank_same_kl")
    if not s:
        return "-"
    bound = "" if s["bound"] == "=" else s["bound"] + " "
    return f"{bound}{s['bits']:.2f} ({bound}{s['size_ratio']:.1f}x)"


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"lowrank vs quantized, {result['zoo']} zoo, held-out text of each expert's domain")
    for c in ("expert", "setting", "bits/param", "ranks", "KL", "top-1", "ppl ratio", "weight err",
              "lowrank bits at this KL", "time s"):
        t.add_column(c, justify="left" if c in ("expert", "setting") else "right")
    for r in result["rows"]:
        ranks = f"{r['ranks']['min']}-{r['ranks']['max']}" if r["ranks"] else "-"
        t.add_row(r["expert"], r["setting"], f"{r['bits_per_param']:.3f}", ranks, f"{r['kl']:.2e}",
                  f"{r['top1']:.4f}", f"{r['ppl_ratio']:.4f}", f"{r['weight_rel_err']:.3f}", same_kl(r),
                  f"{r['compress_s']:.1f}")
    Console(width=160).print(t)
    bits = result["lowrank_bits"]
    s = Table(title="singular value spectrum of the deltas: energy captured at the rank of b bits per parameter")
    for c in ("expert", "layers", *(f"{b:g} bit" for b in bits), "r50 / min", "r90 / min"):
        s.add_column(c, justify="left" if c in ("expert", "layers") else "right")
    for e, spec in result["spectrum"].items():
        for kind, v in spec.items():
            s.add_row(e, f"{kind} ({v['layers']})", *(f"{v['energy_at_bits'][str(b)]:.3f}" for b in bits),
                      f"{v['rank50_share']:.2f}", f"{v['rank90_share']:.2f}")
    Console(width=160).print(s)


def merge_previous(result: dict, path: Path) -> None:
    """A partial run (some experts or settings) replaces only its own rows of ``path``'s result of the same zoo."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    if old.get("zoo") != result["zoo"]:
        return
    done = {(r["expert"], r["setting"]) for r in result["rows"]}
    kept = [r for r in old["rows"] if (r["expert"], r["setting"]) not in done]
    order = {label: i for i, (label, _) in enumerate(settings())}
    experts = list(dict.fromkeys(r["expert"] for r in [*old["rows"], *result["rows"]]))
    result["rows"] = sorted(kept + result["rows"], key=lambda r: (experts.index(r["expert"]),
                                                                   order.get(r["setting"], len(order))))
    result["spectrum"] = {**old.get("spectrum", {}), **result["spectrum"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=["full", "small"], default="full")
    ap.add_argument("--limit", type=int, default=12, help="held-out examples per expert")
    ap.add_argument("--experts", nargs="*", help="subset of experts (default: all)")
    ap.add_argument("--settings", help="comma-separated subset of the settings (default: all of them)")
    ap.add_argument("--json", action="store_true", help="print the result JSON to stdout")
    ap.add_argument("--from-json", type=Path, help="no measuring: tables and plot of a result file written before")
    args = ap.parse_args()
    out = results_dir()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        add_equal_kl(result)
        args.from_json.write_text(json.dumps(result, indent=2))  # with the derived columns
        plot(result, out / "lowrank.png")
        print_tables(result)
        return
    only = args.settings.split(",") if args.settings else None
    known = [label for label, _ in settings()]
    if only and (unknown := sorted(set(only) - set(known))):
        ap.error(f"unknown settings {unknown}; known: {', '.join(known)}")
    result = run(args.zoo, args.limit, args.experts, only)
    merge_previous(result, out / "lowrank.json")
    add_equal_kl(result)
    (out / "lowrank.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "lowrank.png")
    if args.json:
        json.dump(result, sys.stdout, indent=2)
    else:
        print_tables(result)
        print(f"wrote {out / 'lowrank.json'} and {out / 'lowrank.png'}")


if __name__ == "__main__":
    main()
