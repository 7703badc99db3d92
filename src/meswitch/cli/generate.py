"""``meswitch generate``: run prompts through the engine from the command line (streams the answer)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate with a stored expert (or the base, or 'auto')")
    p.add_argument("store", type=Path)
    p.add_argument("prompt", nargs="+", help="one or more user messages (each a separate request, batched)")
    p.add_argument("--expert", default=None, help="expert name, 'auto' (routed) or omitted for the base")
    p.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--base", type=Path, help="base checkpoint (default: the one the store records)")
    p.add_argument("--backend", default="auto", help="delta backend: auto (default: the fastest that runs here), lowbit, int4, pytorch, dense, reference or triton (docs/engine.md)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from meswitch.cli.render import print_json
    from meswitch.engine import EngineConfig, Request, SamplingParams
    from meswitch.front import AUTO, RoutedEngine

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop))
    reqs = [Request(prompt=t, expert=args.expert, params=params) if args.raw
            else Request(messages=[{"role": "user", "content": t}], expert=args.expert, params=params)
            for t in args.prompt]
    engine = RoutedEngine.from_store(args.store, base=args.base, config=EngineConfig(backend=args.backend),
                                     router="auto" if args.expert == AUTO else None)
    if args.json or len(reqs) > 1:
        outs = engine.generate(reqs)
        if args.json:
            print_json([asdict(c) for c in outs])
        else:
            for r, c in zip(reqs, outs, strict=True):
                print(f"### [{c.expert or 'base'}] {r.messages[0]['content'] if r.messages else r.prompt}\n{c.text}\n")
        return 1 if any(c.finish_reason == "error" for c in outs) else 0
    comp = None
    for ev in engine.stream(reqs[0]):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        comp = ev.completion
    route = f", routed: {comp.route.domain} {comp.route.confidence:.2f}" if comp and comp.route else ""
    print(f"\n[{comp.expert or 'base'}{route}; {comp.usage.completion_tokens} tokens, {comp.finish_reason}]",
          file=sys.stderr)
    if comp.finish_reason == "error":
        print(f"meswitch: error: {comp.error}", file=sys.stderr)
        return 2
    return 0
