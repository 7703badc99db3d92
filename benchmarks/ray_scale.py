"""meswitch on Ray Serve: throughput with 1 and 2 engine replicas, and how many replicas a fleet needs.

Measured (this machine): the Ray Serve application (ingress + router, N engine replicas, one torch
thread and one Ray CPU each) on a local Ray cluster, loaded by ``benchmarks/load.py``'s streaming
clients (the ``openai`` async client, held-out questions of every domain, ``model="auto"`` when the
store has a router) for T seconds per configuration; reported as tokens/s and the ratio to 1 replica.
Without --quick a third row runs 1 replica with 2 torch threads (the whole machine in one process).

Projected (arithmetic, ``meswitch.ray_app.capacity``): memory per replica for a Mistral-7B base
(hidden 4096, intermediate 14336, 32 layers, 32 heads / 8 KV heads, vocab 32000) in fp16 with K
experts at the store's measured bits per parameter (its manifest, as ``meswitch inspect`` reads it)
and a 16 x 4096-token fp16 KV cache, for 16, 100 and 1000 experts; the replicas needed, against
whole fp16 models per replica (Ray's own multiplexing).

    python benchmarks/ray_scale.py [--store DIR] [--quick] [--json] [--clients 8] [--seconds 40]

Writes docs/results/ray_scale.json and docs/results/ray_scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir  # noqa: E402
from load import questions, run_load  # noqa: E402

FLEETS = (16, 100, 1000)
DEVICE_GB = 80  # one H100 80GB, decimal gigabytes as sold
KV_BATCH, KV_CONTEXT = 16, 4096


def default_store() -> Path:
    """The full store if it exists, else a store of the small zoo (built and compressed once, cached)."""
    from meswitch.paths import cache_root

    full = cache_root() / "stores" / "full"
    if (full / "manifest.json").is_file():
        return full
    small = cache_root() / "stores" / "ray-bench-small"
    if not (small / "manifest.json").is_file():
        from meswitch.cli import main as cli
        from meswitch.zoo.build import build_zoo

        build_zoo("small")
        if cli(["compress", "--zoo", "small", "--out", str(small)]) != 0:
            raise SystemExit("compressing the small zoo failed")
    return small


def bits_per_param(store: Path) -> float:
    """Mean bits per delta parameter over the store's experts, from its manifest (as ``meswitch inspect``)."""
    from meswitch.store.summary import summarize

    bpp = [e["bits_per_param"] for e in summarize(store)["experts"].values() if e["bits_per_param"]]
    if not bpp:
        raise SystemExit(f"{store}: no expert records bits_per_param")
    return sum(bpp) / len(bpp)


def projection(bpp: float, device_gb: float) -> dict[str, Any]:
    from meswitch.ray_app.capacity import (
        GIB,
        MISTRAL_7B,
        expert_bytes,
        kv_cache_bytes,
        max_experts_per_replica,
        plan,
        whole_model_replicas,
    )

    shape, device = MISTRAL_7B, int(device_gb * 1e9)
    kv = kv_cache_bytes(shape, KV_BATCH, KV_CONTEXT)
    k_fit = max_experts_per_replica(shape, bpp, device, kv)
    k_fit_int4 = max_experts_per_replica(shape, bpp, device, kv, int4_cache=True)
    rows = []
    for n in FLEETS:
        for k in sorted({min(16, n), min(k_fit, n)}):
            p = plan(shape, n, k, bpp, kv)
            per, whole = whole_model_replicas(shape, n, device, kv)
            rows.append({"experts": n, "k": p.k, "base_gib": p.base_bytes / GIB, "experts_gib": p.experts_bytes / GIB,
                         "kv_gib": p.kv_bytes / GIB, "replica_gib": p.replica_bytes / GIB, "replicas": p.replicas,
                         "fits_device": p.replica_bytes <= device, "whole_models_per_replica": per,
                         "whole_model_replicas": whole})
    return {"shape": vars(shape) | {"params": shape.params, "linear_params": shape.linear_params},
            "bits_per_param": bpp, "device_gb": device_gb, "kv": {"batch": KV_BATCH, "context": KV_CONTEXT},
            "expert_gib": expert_bytes(shape, bpp) / GIB, "expert_gib_with_int4_cache":
            expert_bytes(shape, bpp, int4_cache=True) / GIB, "k_fit": k_fit, "k_fit_with_int4_cache": k_fit_int4,
            "base_fp16_gib": 2 * shape.params / GIB, "rows": rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(store: Path, runs: list[tuple[int, int]], clients: int, seconds: float, max_tokens: int) -> list[dict]:
    """Throughput of the Ray application for each (replicas, torch threads per replica)."""
    import ray
    from ray import serve

    from meswitch.ray_app import RayAppConfig
    from meswitch.ray_app.launch import deploy

    qs = questions(store, per_domain=50)
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
             runtime_env={"env_vars": env})
    out = []
    try:
        for replicas, threads in runs:
            config = RayAppConfig(store=str(store), replicas=replicas, replica_cpus=threads,
                                  torch_threads=threads, max_batch=16, max_ongoing_requests=max(16, clients),
                                  max_pending=max(64, 2 * clients))
            t0 = time.perf_counter()
            url = deploy(config, port=free_port())
            up = time.perf_counter() - t0
            asyncio.run(run_load(url, qs, clients, min(5.0, seconds), max_tokens, "none"))  # warm-up: loads, merges
            r = asyncio.run(run_load(url, qs, clients, seconds, max_tokens, "none"))
            r.pop("server_metrics_sample", None)
            out.append({"replicas": replicas, "torch_threads": threads, "deploy_s": round(up, 1), **r})
            print(f"  {replicas} replica(s) x {threads} thread(s): {r['tokens_per_s']:.1f} tokens/s, "
                  f"{r['completed']} requests, {r['errors']} errors", file=sys.stderr, flush=True)
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()
    base = out[0]["tokens_per_s"] or float("nan")
    for r in out:
        r["ratio_vs_1_replica"] = r["tokens_per_s"] / base
    return out


def markdown(result: dict[str, Any]) -> str:
    t, p = result["throughput"], result["projection"]
    lines = [f"# meswitch on Ray Serve ({result['machine']})", "",
             f"Store `{result['store']}`, {result['clients']} streaming clients x {result['seconds']:g} s, "
             f"max_tokens {result['max_tokens']}.", "",
             "| replicas | torch threads each | completed | errors | tokens/s | ratio vs 1 replica | latency p50 s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['replicas']} | {r['torch_threads']} | {r['completed']} | {r['errors']} | {r['tokens_per_s']:.1f} | "
              f"{r['ratio_vs_1_replica']:.2f}x | {r['latency_p50_s'] or 0:.2f} |" for r in t]
    lines += ["", f"Projected for a Mistral-7B base (fp16, {p['base_fp16_gib']:.1f} GiB) at {p['bits_per_param']:.3f} "
              f"bits/param: {p['expert_gib']:.2f} GiB per expert ({p['expert_gib_with_int4_cache']:.2f} GiB with the "
              f"CPU engine's int4 cache); KV cache {p['kv']['batch']} x {p['kv']['context']} tokens fp16; "
              f"{p['device_gb']:g} GB per replica fits K = {p['k_fit']} experts ({p['k_fit_with_int4_cache']} with "
              "the int4 cache).", "",
             "| experts | K per replica | base GiB | experts GiB | KV GiB | per replica GiB | replicas | "
             "whole fp16 models per replica | replicas (whole models) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['experts']} | {r['k']} | {r['base_gib']:.1f} | {r['experts_gib']:.1f} | {r['kv_gib']:.1f} | "
              f"{r['replica_gib']:.1f} | {r['replicas']} | {r['whole_models_per_replica']} | "
              f"{r['whole_model_replicas']} |" for r in p["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, help="delta store (default: the full store, else a small-zoo store)")
    ap.add_argument("--quick", action="store_true", help="fewer seconds, no 1-replica x 2-threads row")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, help="per configuration (default 40, --quick 12)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device-gb", type=float, default=DEVICE_GB, help="accelerator memory per replica (GB)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead of tables")
    args = ap.parse_args()

    store = (args.store or default_store()).expanduser()
    seconds = args.seconds or (12.0 if args.quick else 40.0)
    runs = [(1, 1), (2, 1)] + ([] if args.quick else [(1, 2)])
    bpp = bits_per_param(store)
    result = {"machine": machine(), "store": str(store), "quick": args.quick, "clients": args.clients,
              "seconds": seconds, "max_tokens": args.max_tokens,
              "throughput": measure(store, runs, args.clients, seconds, args.max_tokens),
              "projection": projection(bpp, args.device_gb)}
    (results_dir() / "ray_scale.json").write_text(json.dumps(result, indent=2) + "\n")
    (results_dir() / "ray_scale.md").write_text(markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from meswitch.cli.render import print_table

    print_table(f"Ray Serve throughput ({args.clients} clients x {seconds:g} s, max_tokens {args.max_tokens})",
                ["replicas", "threads each", "completed", "errors", "tokens/s", "vs 1 replica"],
                [[r["replicas"], r["torch_threads"], r["completed"], r["errors"], f"{r['tokens_per_s']:.1f}",
                  f"{r['ratio_vs_1_replica']:.2f}x"] for r in result["throughput"]])
    p = result["projection"]
    print_table(f"Mistral-7B projection: {p['bits_per_param']:.3f} bits/param, {p['expert_gib']:.2f} GiB/expert, "
                f"{p['device_gb']:g} GB/replica fits K={p['k_fit']}",
                ["experts", "K", "GiB/replica", "replicas", "whole fp16 models/replica", "replicas (whole)"],
                [[r["experts"], r["k"], f"{r['replica_gib']:.1f}", r["replicas"], r["whole_models_per_replica"],
                  r["whole_model_replicas"]] for r in p["rows"]])
    print(f"wrote {results_dir() / 'ray_scale.json'} and ray_scale.md")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
