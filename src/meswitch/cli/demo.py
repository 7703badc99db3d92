"""``meswitch demo``: the whole main job, end to end, on the full reference zoo.

zoo (cached) -> compress its experts into a store (experts already there with the same recipe are
kept) -> train the router (when the router package is installed) -> start the OpenAI-compatible
server -> one query per domain through the official ``openai`` client with ``model="auto"`` ->
a table of query, routed expert and answer, the memory footprint against full experts, the URL ->
serve until Ctrl-C (``--once`` or ``DEMO_ONCE=1``: stop after the table).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

QUERIES = {
    "math": "A baker fills 23 trays with 12 rolls each and sells 150 rolls. How many rolls are left?",
    "code": "Write a Python function that returns the factorial of n.",
    "general": "What is a nice way to spend a rainy Sunday afternoon?",
}


def default_store() -> Path:
    from meswitch.paths import cache_root

    return cache_root() / "stores" / "full"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="zoo -> compress -> router -> server -> one query per domain (the main job)")
    p.add_argument("--store", type=Path, help="delta store to build and serve (default: the cache's stores/full)")
    p.add_argument("--size", choices=["full", "small"], default="full", help="which reference zoo (default full)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per demo answer")
    p.add_argument("--once", action="store_true", help="exit after the table (also: DEMO_ONCE=1)")
    p.add_argument("--no-build", action="store_true", help="serve the store as it is: no zoo build, no compression")
    p.add_argument("--prepare", action="store_true",
                   help="build the zoo, compress and train the router, then exit without serving (make bench)")
    p.set_defaults(func=cmd_demo)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ---- stages ------------------------------------------------------------------------------------


def build_store(size: str, store: Path) -> None:
    """The zoo (cached), then every expert of it that the store lacks or holds from another recipe."""
    from meswitch.jobs.zoo_store import build_zoo_store

    build_zoo_store(size, store, say=_say)


def ensure_router(store: Path) -> bool:
    """The store's router, trained in-process unless it has one (its table printed as by ``meswitch router
    train``); False, with the reason printed, when routing is unavailable."""
    from meswitch.jobs.store_router import ensure_router as ensure_store_router

    step = ensure_store_router(store, say=_say, progress=True)
    if step.trained and step.router is not None:
        from meswitch.cli.router import print_trained

        print_trained(step.router, store)
    return step.router is not None


def ask(url: str, routed: bool, max_tokens: int) -> list[dict[str, Any]]:
    """One query per domain, all at once (they share the engine's batch), through the openai client."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="demo", max_retries=0, timeout=600)

    def one(domain: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(
            model="auto" if routed else domain, messages=[{"role": "user", "content": QUERIES[domain]}],
            temperature=0, max_tokens=max_tokens)
        resp = raw.parse()
        info = resp.model_extra.get("meswitch") or {}
        return {"domain": domain, "query": QUERIES[domain], "expert": raw.headers.get("x-meswitch-expert"),
                "confidence": info.get("confidence"), "answer": resp.choices[0].message.content,
                "tokens": resp.usage.completion_tokens, "seconds": time.perf_counter() - t0}

    with ThreadPoolExecutor(len(QUERIES)) as pool:
        return list(pool.map(one, QUERIES))


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def report(rows: list[dict[str, Any]], store: Path, stats: dict[str, Any], routed: bool) -> None:
    from meswitch.cli.render import print_table
    from meswitch.store.summary import summarize

    table = [[_clip(r["query"], 48), r["expert"] + ("" if r["confidence"] is None else f" ({r['confidence']:.2f})"),
              _clip(r["answer"], 90), f"{r['tokens']} tok / {r['seconds']:.1f} s"] for r in rows]
    title = "one query per domain, model='auto'" if routed else "one query per domain, model=<domain> (no router)"
    print_table(title, ["query", "routed expert (confidence)" if routed else "expert", "answer", "time"],
                table)
    fp = summarize(store)["footprint"]
    mib = 2**20
    print(f"memory: base + {fp['experts']} compressed experts = {fp['store_bytes'] / mib:.0f} MiB (fp16 base) "
          f"vs {fp['experts']} full fp16 experts = {fp['fp16_experts_bytes'] / mib:.0f} MiB "
          f"({fp['ratio']:.2f}x smaller)")
    pool = stats.get("experts") or {}
    print(f"engine: {len(pool.get('resident', []))} experts resident, deltas {pool.get('resident_bytes', 0) / mib:.0f}"
          f" MiB, merged weights {pool.get('merged_bytes', 0) / mib:.0f} MiB (float32 on this device); "
          f"process RSS {_rss() / mib:.0f} MiB")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cmd_demo(args: argparse.Namespace) -> int:
    from meswitch.engine import Engine
    from meswitch.front import load_store_router
    from meswitch.server import ServerConfig, ThreadedServer, engine_app

    once = args.once or os.environ.get("DEMO_ONCE", "") not in ("", "0")
    store = (args.store or default_store()).expanduser()
    if not args.no_build:
        build_store(args.size, store)
    routed = ensure_router(store)
    if args.prepare:
        _say(f"prepared {store}" + (" (with its router)" if routed else ""))
        return 0
    _say(f"server: loading {store}")
    engine = Engine.from_store(store)
    app = engine_app(engine, load_store_router(engine.store) if routed else None, ServerConfig())
    server = ThreadedServer(app, args.host, args.port).start()
    try:
        _say(f"server: {server.url}/v1 (experts: {', '.join(engine.experts)}{', auto' if routed else ''})")
        rows = ask(server.url, routed, args.max_tokens)
        stats = app.state.engine.stats().result(30)
        report(rows, store, stats, routed)
        print(f"\nserving on {server.url}/v1  (OpenAI API; try: curl {server.url}/v1/models)")
        if once:
            return 0
        print("Ctrl-C to stop", flush=True)
        while server.alive:
            time.sleep(0.5)
        return 0
    finally:
        server.stop()
