"""Load test of the OpenAI-compatible server: N concurrent streaming clients for T seconds, mixed domains.

Starts ``meswitch serve STORE`` in a subprocess (or uses ``--url``), then each client sends chat
requests one after another through the official ``openai`` async client with ``stream=True``,
cycling through held-out questions of the zoo's domains (``model="auto"`` when the server routes,
else each question's domain expert). Reports completed requests, errors by kind, time to first
token (p50/p99), latency and generated tokens per second; writes docs/results/load.json.

    python benchmarks/load.py --clients 8 --seconds 60 [--json] [--store PATH] [--url URL]
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
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, results_dir  # noqa: E402

FALLBACK = {
    "math": ["Tom has 3 boxes of 12 pencils and gives away 7. How many pencils are left?"],
    "code": ["Write a Python function that reverses a string."],
    "general": ["What is your favourite season, and why?"],
}


def questions(store: Path, per_domain: int, seed: int = 0) -> list[tuple[str, str]]:
    """(domain, user text) pairs from the zoo's held-out test splits next to the store's base, shuffled."""
    from meswitch.store import DeltaStore

    base = Path(DeltaStore.open(store).extra.get("base_path", ""))
    rng = random.Random(seed)
    out = []
    for domain, fallback in FALLBACK.items():
        path = base.parent / "data" / f"{domain}.test.jsonl"
        texts = [json.loads(line)["text"] for line in path.open()] if path.is_file() else fallback
        rng.shuffle(texts)
        out += [(domain, t[:1000]) for t in texts[:per_domain]]
    rng.shuffle(out)
    return out


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def client_loop(client: Any, qs: list[tuple[str, str]], start: int, stop_at: float, routed: bool,
                      max_tokens: int, records: list[dict[str, Any]]) -> None:
    import openai

    i = start
    while time.perf_counter() < stop_at:
        domain, text = qs[i % len(qs)]
        i += 1
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"domain": domain, "ttft": None, "tokens": 0, "error": None, "expert": None}
        try:
            stream = await client.chat.completions.create(
                model="auto" if routed else domain, messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens, temperature=0.7, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and rec["ttft"] is None:
                    rec["ttft"] = time.perf_counter() - t0
                if chunk.model_extra.get("meswitch") and rec["expert"] is None:
                    rec["expert"] = chunk.model_extra["meswitch"].get("expert")
                if chunk.usage is not None:
                    rec["tokens"] = chunk.usage.completion_tokens
        except openai.APIStatusError as e:
            rec["error"] = f"HTTP {e.status_code}"
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            rec["error"] = type(e).__name__
        rec["latency"] = time.perf_counter() - t0
        rec["end"] = time.perf_counter()
        records.append(rec)


async def run_load(url: str, qs: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int,
                   api_key: str) -> dict[str, Any]:
    import httpx
    import openai

    headers = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as h:
        models = [m["id"] for m in (await h.get("/v1/models")).json()["data"]]
    routed = "auto" in models
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600,
                                http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)))
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(client_loop(client, qs, k * 7, stop_at, routed, max_tokens, records)
                           for k in range(clients)))
    wall = time.perf_counter() - t0
    async with httpx.AsyncClient(base_url=url, timeout=30) as h:
        metrics = (await h.get("/metrics")).text
    ok = [r for r in records if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "seconds": seconds, "wall_s": round(wall, 2), "max_tokens": max_tokens,
        "routed": routed, "models": models,
        "completed": len(ok), "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r["error"] for r in records if r["error"])),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "latency_p50_s": pct([r["latency"] for r in ok], 50), "latency_p99_s": pct([r["latency"] for r in ok], 99),
        "generated_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall,
        "by_domain": {d: {"completed": sum(1 for r in ok if r["domain"] == d),
                          "routed_to_own_expert": sum(1 for r in ok if r["domain"] == d and r["expert"] == d)}
                      for d in FALLBACK},
        "server_metrics_sample": [line for line in metrics.splitlines()
                                  if line.startswith(("meswitch_expert_loads_total", "meswitch_requests_total"))],
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    import httpx

    port = args.port
    cmd = [sys.executable, "-m", "meswitch", "serve", str(args.store), "--port", str(port), "--log-level", "warning",
           "--max-batch", str(args.max_batch), "--max-concurrency", str(max(64, args.clients * 2)),
           "--api-key", args.api_key]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not come up within 600 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=Path.home() / ".cache" / "meswitch" / "stores" / "full")
    p.add_argument("--url", help="use a running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("MESWITCH_API_KEY", "load-test"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args()

    qs = questions(args.store, per_domain=50)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    try:
        result = asyncio.run(run_load(url, qs, args.clients, args.seconds, args.max_tokens, args.api_key))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result.update(machine=machine(), omp_threads=os.environ.get("OMP_NUM_THREADS"), store=str(args.store))
    (results_dir() / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from meswitch.cli.render import print_table

    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print_table(f"{args.clients} streaming clients x {args.seconds:g} s, max_tokens {args.max_tokens}"
                f" ({'auto-routed' if result['routed'] else 'expert by name'})",
                ["completed", "errors", "TTFT p50 s", "TTFT p99 s", "latency p50 s", "tokens/s", "requests/s"],
                [[result["completed"], result["errors"], f(result["ttft_p50_s"]), f(result["ttft_p99_s"]),
                  f(result["latency_p50_s"]), f"{result['tokens_per_s']:.1f}", f"{result['requests_per_s']:.2f}"]])
    if result["error_kinds"]:
        print("errors:", result["error_kinds"])
    print(f"wrote {results_dir() / 'load.json'}")


if __name__ == "__main__":
    main()
