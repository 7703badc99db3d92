"""A thousand experts on one box: the OpenAI server under Zipf traffic over N experts, against the base.

For each N (default 16, 100, 1000) a store of N synthetic experts over the zoo's base (each linear weight
moved by 2% of its std, stored round-to-nearest at 1, 1, 2 and 3 bits in turn, ~1.5 bits per parameter;
norms moved by 1%, dense fp16), then, in a fresh process per N: an engine with a resident budget
(``--budget-experts`` experts' worth of in-memory bytes), the real HTTP server (``meswitch.server``,
in-process, port 0) and ``--clients`` concurrent clients (the official ``openai`` AsyncOpenAI, in a
child process) for ``--seconds``: first every request to the base alone, then each request to an
expert drawn from Zipf(1.0) (the k-th expert with probability proportional to 1/k). Reported per N:
tokens/s of both and their ratio, the resident hit rate (admissions that found their expert resident
without waiting), cold loads (count, p50/p99 ms: read, verify on a file's first read, decode, build the
backend's forms, attach), peak RSS of the server process, and request latency.

Experts: ``--distinct`` encoded deltas of the linear layers are made once; expert i stores delta
``i % distinct`` with norm deltas of its own seed, so each expert is its own file of its own bytes
(~23.5 MB for the 135M base) and every load reads a real file. The store of the largest N is cached
in ``~/.cache/meswitch/stores/scale-<base>-<N>``; the smaller stores are its first experts, their files
hard links to its files (no more disk).

    python benchmarks/scale.py [--quick] [--experts 16,100,1000] [--base full|small|DIR] [--seconds 60]
                               [--clients 64] [--budget-experts 16] [--max-tokens 16] [--prefetch 16]
    python benchmarks/scale.py [--quick] --render     # the .md and .png again from the .json

``--quick``: the small zoo's base (4 blocks), 8 and 32 experts, 16 clients, 20 s per phase (a couple of
minutes); it writes docs/results/scale_quick.*, the full run docs/results/scale.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PeakRSS, machine, results_dir  # noqa: E402

from meswitch.paths import cache_root  # noqa: E402

BITS = (1, 1, 2, 3)
PROMPTS = ["What is 12 times 7?", "Write a Python function that reverses a string.",
           "Tell me about your favourite season.", "Explain what a prime number is.",
           "How do I sort a list in Python?", "What should I cook tonight?"]
BASE_ID = "base"


def base_dir(base: str) -> Path:
    return cache_root() / "zoo" / base / "base" if base in ("full", "small") else Path(base).expanduser()


# ---- the stores ----------------------------------------------------------------------------------

def _encoded(state: dict, linears: list[str], seed: int) -> tuple[dict, dict]:
    import torch

    from meswitch.compress.codec import encode_delta

    g = torch.Generator().manual_seed(seed)
    layers, meta = {}, {}
    for i, n in enumerate(linears):
        w = state[f"{n}.weight"]
        d = torch.randn(w.shape, generator=g) * w.std() * 0.02
        layers[n], meta[n] = encode_delta(d, "rtn", BITS[(i + seed) % 4], 0)
    return layers, meta


def _norms(state: dict, seed: int) -> tuple[dict, dict]:
    import torch

    g = torch.Generator().manual_seed(10_000 + seed)
    layers, meta = {}, {}
    for pn, t in state.items():
        if "norm" in pn:
            layers[pn] = {"delta": (torch.randn(t.shape, generator=g) * 0.01).half()}
            meta[pn] = {"method": "dense", "bits": 16, "shape": list(t.shape), "salient": 0}
    return layers, meta


def expert_name(i: int) -> str:
    return f"x{i:04d}"


def build_store(base: Path, root: Path, n: int, distinct: int) -> None:
    """The store of ``n`` experts at ``root`` (kept, and completed when it holds fewer)."""
    import torch

    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore, base_info, fingerprint_model

    model, _ = load_checkpoint(base)
    store = DeltaStore.create(root, fingerprint_model(model), base_info(model))
    store.set_extra("base_path", str(base.resolve()))
    have = set(store.experts)
    todo = [i for i in range(n) if expert_name(i) not in have]
    if not todo:
        return
    linears = [m for m, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and m != "lm_head"]
    state = model.state_dict()
    t0 = time.perf_counter()
    encoded = [_encoded(state, linears, k) for k in range(distinct)]
    print(f"  {distinct} distinct deltas encoded in {time.perf_counter() - t0:.1f} s", flush=True)

    def items(chunk: list[int]):
        for i in chunk:
            lin, lin_meta = encoded[i % distinct]
            norms, norm_meta = _norms(state, i)
            yield expert_name(i), {**lin, **norms}, {**lin_meta, **norm_meta}, {
                "method": "rtn-mixed-synthetic", "delta_of": i % distinct}

    for s in range(0, len(todo), 100):  # a killed build keeps what it wrote, in steps of 100
        t0 = time.perf_counter()
        store.add_experts(items(todo[s : s + 100]))
        print(f"  stored {min(s + 100, len(todo))}/{len(todo)} experts ({time.perf_counter() - t0:.0f} s)",
              flush=True)


def subset_store(full: Path, root: Path, n: int) -> None:
    """A store of the first ``n`` experts of ``full``: its manifest's entries, the files hard-linked."""
    from meswitch.store import DeltaStore
    from meswitch.utils.atomic import atomic_write_json

    src = DeltaStore.open(full)
    names = [expert_name(i) for i in range(n)]
    if root.is_dir() and (root / "manifest.json").is_file() and DeltaStore.open(root).experts == names:
        return
    manifest = json.loads((full / "manifest.json").read_text())
    manifest["experts"] = {k: manifest["experts"][k] for k in names}
    (root / "experts").mkdir(parents=True, exist_ok=True)
    for k in names:
        dst = root / manifest["experts"][k]["file"]
        dst.unlink(missing_ok=True)
        os.link(src.path / manifest["experts"][k]["file"], dst)
    atomic_write_json(root / "manifest.json", manifest)


# ---- the clients (a child process) ---------------------------------------------------------------

def zipf_choices(n: int, count: int, seed: int, s: float = 1.0) -> list[int]:
    """``count`` draws of an expert index from Zipf(``s``) over ``n`` (index 0 the most popular)."""
    rng = random.Random(seed)
    return rng.choices(range(n), weights=[1 / (k + 1) ** s for k in range(n)], k=count)


async def _clients(url: str, models: list[str], clients: int, seconds: float, max_tokens: int,
                   seed: int) -> dict[str, Any]:
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="scale", max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)))
    picks = iter(zipf_choices(len(models), 1_000_000, seed) if len(models) > 1 else [0] * 1_000_000)
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def loop(k: int) -> None:
        i = k
        while time.perf_counter() < stop_at:
            model = models[next(picks)]
            t = time.perf_counter()
            rec: dict[str, Any] = {"model": model, "tokens": 0, "error": None}
            try:
                r = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
                rec["tokens"] = r.usage.completion_tokens
            except openai.APIStatusError as e:
                rec["error"] = f"HTTP {e.status_code}"
            except Exception as e:  # noqa: BLE001 - counted
                rec["error"] = type(e).__name__
            rec["latency"], rec["end"] = time.perf_counter() - t, time.perf_counter() - t0
            records.append(rec)
            i += clients

    await asyncio.gather(*(loop(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in records if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    lat = sorted(r["latency"] for r in ok)
    return {"wall_s": wall, "completed": len(ok), "errors": len(records) - len(ok),
            "error_kinds": sorted({r["error"] for r in records if r["error"]}),
            "tokens": tokens, "tokens_per_s": tokens / wall,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "distinct_models": len({r["model"] for r in ok})}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def run_clients(url: str, models: list[str], args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The clients in a child process (so that their Python does not share the server's GIL)."""
    cmd = [sys.executable, __file__, "--clients-of", url, "--models", ",".join(models),
           "--clients", str(args.clients), "--seconds", str(args.seconds), "--max-tokens", str(args.max_tokens),
           "--seed", str(seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- one N (a child process: its own peak RSS) ---------------------------------------------------

def _engine_stats(app: Any) -> dict[str, Any]:
    return app.state.engine.stats().result(60)


def _residency(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Hits, misses and loads between two ``Engine.stats()``, and the cold loads' times."""
    b, a = before["experts"]["experts"], after["experts"]["experts"]
    hits = sum(a[n]["hits"] - b[n]["hits"] for n in a)
    misses = sum(a[n]["misses"] - b[n]["misses"] for n in a)
    ms = [x for n in a for x in a[n]["load_ms"][len(b[n]["load_ms"]) :]]
    return {"admissions": hits + misses, "hit_rate": hits / (hits + misses) if hits + misses else None,
            "loads": len(ms), "background_loads": sum(a[n]["background"] - b[n]["background"] for n in a),
            "load_p50_ms": pct(ms, 50), "load_p99_ms": pct(ms, 99),
            "evictions": sum(a[n]["evictions"] - b[n]["evictions"] for n in a),
            "resident_at_end": len(after["experts"]["resident"]),
            "resident_bytes_at_end": after["experts"]["resident_bytes"]}


def cold_load_breakdown(engine: Any, names: list[str]) -> dict[str, Any]:
    """Where a cold load's time goes, the engine idle (median over ``names``, experts the traffic rarely
    asks for): reading the file with its first verification (size, SHA-256, layer hashes), reading it
    again (verified: shapes only), decoding and building the backend's forms, attaching them."""
    import statistics

    from meswitch.deltas import decode

    parts: dict[str, list[float]] = {"read_verify_ms": [], "read_ms": [], "decode_ms": [], "stage_ms": [],
                                     "attach_ms": []}
    store, pool = engine.store, engine.pool
    for name in names:
        t0 = time.perf_counter()
        layers, entry = store.read_expert(name)
        t1 = time.perf_counter()
        store.read_expert(name)
        t2 = time.perf_counter()
        for layer, fields in layers.items():
            decode(fields, entry["layers"][layer])
        t3 = time.perf_counter()
        staged = pool.stage(pool.lookup(name))
        t4 = time.perf_counter()
        pool.attach(pool.lookup(name), staged)
        t5 = time.perf_counter()
        pool.evict(pool.lookup(name))
        for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            parts[key].append(dt * 1e3)
    for st in pool.stats.values():  # not the traffic's loads
        st.loads, st.load_ms, st.evictions = 0, [], 0
    return {k: statistics.median(v) for k, v in parts.items()}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from meswitch.engine import Engine, EngineConfig
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.server import ServerConfig, engine_app
    from meswitch.server.app import ThreadedServer
    from meswitch.store import DeltaStore

    torch.set_num_threads(args.threads)
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        store = DeltaStore.open(args.store)
        base, tok = load_checkpoint(base_dir(args.base))
        names = store.experts
        one = store.total_bytes(names[0])
        # a context of 512 (prompts of ~40 tokens): the KV cache of 16 slots x 4096 would be 3 GB of the RSS
        config = EngineConfig(max_batch=args.max_batch, max_resident_bytes=int(args.budget_experts * one * 1.25),
                              prefetch=args.prefetch, max_context=512)
        engine = Engine(store, base, tok, config)  # files are verified at their first load, once
        breakdown = cold_load_breakdown(engine, names[-3:])
        app = engine_app(engine, None, ServerConfig(max_pending=4 * args.clients, base_model_id=BASE_ID,
                                                    max_tokens=args.max_tokens))
        startup = time.perf_counter() - t0
        with ThreadedServer(app) as srv:
            run_clients(srv.url, [BASE_ID], argparse.Namespace(**{**vars(args), "seconds": 5}), 0)  # warm-up
            rss_base = PeakRSS().__enter__()
            base_run = run_clients(srv.url, [BASE_ID], args, 1)
            rss_base.__exit__()
            before = _engine_stats(app)
            expert_run = run_clients(srv.url, names, args, 2)
            after = _engine_stats(app)
    return {"experts": len(names), "store": str(args.store), "expert_file_bytes": one,
            "budget_bytes": config.max_resident_bytes, "budget_experts": args.budget_experts,
            "prefetch": args.prefetch, "startup_s": startup, "base": base_run, "zipf": expert_run,
            "ratio": expert_run["tokens_per_s"] / base_run["tokens_per_s"] if base_run["tokens_per_s"] else None,
            "residency": _residency(before, after), "peak_rss_bytes": peak.peak, "cold_load_breakdown": breakdown,
            "peak_rss_base_phase_bytes": rss_base.peak, "backend": after["backend"]}


# ---- the report ----------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    cols = ["experts", "base tok/s", "Zipf tok/s", "ratio", "hit rate", "loads (background)", "cold load p50 ms",
            "cold load p99 ms", "peak RSS MiB", "latency p50 / p99 s", "errors"]
    out = []
    for r in rows:
        z, res = r["zipf"], r["residency"]
        out.append([r["experts"], f(r["base"]["tokens_per_s"]), f(z["tokens_per_s"]), f(r["ratio"], 2),
                    f(res["hit_rate"], 3), f"{res['loads']} ({res['background_loads']})", f(res["load_p50_ms"], 0),
                    f(res["load_p99_ms"], 0), f(r["peak_rss_bytes"] / 2**20, 0),
                    f"{f(z['latency_p50_s'], 2)} / {f(z['latency_p99_s'], 2)}", z["errors"] + r["base"]["errors"]])
    return cols, out


def markdown(result: dict[str, Any]) -> str:
    cols, rows = table(result["runs"])
    a = result["args"]
    lines = [f"# Scale: N experts under Zipf(1.0) traffic ({result['machine']})", "",
             f"Base `{a['base']}`, {a['clients']} clients, {a['seconds']} s per phase, max_tokens {a['max_tokens']}, "
             f"max_batch {a['max_batch']}, budget {a['budget_experts']} experts' files x 1.25, prefetch "
             f"{a['prefetch']}, {a['threads']} torch threads; `{result['command']}`, {result['when']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    parts = [(r["experts"], r.get("cold_load_breakdown")) for r in result["runs"]]
    if any(b for _, b in parts):
        lines += ["", "A cold load taken apart (the engine idle, median of 3 experts, ms): reading the file the "
                  "first time (size, SHA-256, layer hashes), reading it verified (shapes only), decoding the "
                  "records (unpacking the codes), staging (read + decode + the backend's forms), attaching.", "",
                  "| experts | first read + verify | read, verified | decode | stage | attach |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {b['read_verify_ms']:.0f} | {b['read_ms']:.0f} | {b['decode_ms']:.0f} | "
                  f"{b['stage_ms']:.0f} | {b['attach_ms']:.0f} |" for n, b in parts if b]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    n = [r["experts"] for r in runs]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (ax[0, 0], "tokens/s vs the base (same run)", [("Zipf / base", [r["ratio"] for r in runs])], 0.5),
        (ax[0, 1], "resident hit rate", [("hit rate", [r["residency"]["hit_rate"] for r in runs])], None),
        (ax[1, 0], "cold load (ms)", [("p50", [r["residency"]["load_p50_ms"] for r in runs]),
                                      ("p99", [r["residency"]["load_p99_ms"] for r in runs])], 100),
        (ax[1, 1], "peak RSS (MiB)", [("server process", [r["peak_rss_bytes"] / 2**20 for r in runs])], None),
    ]
    for a, title, series, target in panels:
        for label, ys in series:
            a.plot(n, [float("nan") if y is None else y for y in ys], "o-", label=label)
        if target is not None:
            a.axhline(target, ls="--", c="gray", label="target")
        a.set_xscale("log")
        a.set_xlabel("experts in the store")
        a.set_title(title)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--experts", default=None, help="comma-separated N (default 16,100,1000; quick 8,32)")
    p.add_argument("--base", default=None, help="full, small or a checkpoint directory (default full; quick small)")
    p.add_argument("--seconds", type=float, default=None, help="per phase (default 60; quick 20)")
    p.add_argument("--clients", type=int, default=None, help="(default 64; quick 16)")
    p.add_argument("--budget-experts", type=float, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prefetch", type=int, default=16)
    p.add_argument("--distinct", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--render", action="store_true", help="write the .md and .png again from the .json")
    # internal: one N in a child process, or the clients
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--clients-of", help=argparse.SUPPRESS)
    p.add_argument("--models", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    q = args.quick
    args.experts = args.experts or ("8,32" if q else "16,100,1000")
    args.base = args.base or ("small" if q else "full")
    args.seconds = args.seconds or (20 if q else 60)
    args.clients = args.clients or (16 if q else 64)
    if args.clients_of:
        print(json.dumps(asyncio.run(_clients(args.clients_of, args.models.split(","), args.clients, args.seconds,
                                              args.max_tokens, args.seed))))
        return
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.render:  # the tables and plot again, from the JSON
        stem = results_dir() / ("scale_quick" if q else "scale")
        result = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, stem.with_suffix(".png"))
        print(markdown(result))
        return

    sizes = sorted(int(x) for x in args.experts.split(","))
    tag = args.base if args.base in ("full", "small") else Path(args.base).name
    stores = cache_root() / "stores"
    biggest = stores / f"scale-{tag}-{sizes[-1]}"
    print(f"store of {sizes[-1]} experts: {biggest}", flush=True)
    build_store(base_dir(args.base), biggest, sizes[-1], args.distinct)
    stem = results_dir() / ("scale_quick" if q else "scale")
    result = {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
              "args": {k: v for k, v in vars(args).items() if k in (
                  "quick", "experts", "base", "seconds", "clients", "budget_experts", "max_tokens", "max_batch",
                  "prefetch", "distinct", "threads")},
              "targets": {"ratio_at_1000": 0.5, "cold_load_p50_ms": 100}, "runs": []}
    for n in sizes:
        root = biggest if n == sizes[-1] else stores / f"scale-{tag}-{n}"
        if root != biggest:
            subset_store(biggest, root, n)
        print(f"== {n} experts", flush=True)
        cmd = [sys.executable, __file__, "--one", "--store", str(root), "--base", args.base,
               "--seconds", str(args.seconds), "--clients", str(args.clients), "--budget-experts",
               str(args.budget_experts), "--max-tokens", str(args.max_tokens), "--max-batch", str(args.max_batch),
               "--prefetch", str(args.prefetch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result["runs"].append(r := json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"   base {r['base']['tokens_per_s']:.1f} tok/s, Zipf {r['zipf']['tokens_per_s']:.1f} tok/s "
              f"({r['ratio']:.2f}x), hit rate {r['residency']['hit_rate']}, loads {r['residency']['loads']}, "
              f"p50 {r['residency']['load_p50_ms']} ms", flush=True)
        # written after every N: a run stopped part-way keeps what it measured
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(result))
        plot(result, stem.with_suffix(".png"))
    runs = result["runs"]
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from meswitch.cli.render import print_table

    cols, rows = table(runs)
    print_table(f"{args.clients} clients, Zipf(1.0) over N experts vs the base alone ({args.base} base)", cols, rows)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
