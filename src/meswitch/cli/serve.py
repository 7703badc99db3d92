"""``meswitch serve STORE``: the OpenAI-compatible HTTP server (needs the ``serve`` extra).

``--ray`` serves the same API from Ray Serve over N engine replicas (needs the ``ray`` extra;
docs/ray.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    # Defaults come from the config dataclasses (cheap to import); engine settings left unset (None)
    # take EngineConfig's defaults when the command runs (its module imports torch).
    from meswitch.ray_app.config import RayAppConfig
    from meswitch.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig

    p = sub.add_parser("serve", help="serve a store's experts over an OpenAI-compatible HTTP API")
    p.add_argument("store", type=Path)
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $MESWITCH_API_KEY)")
    p.add_argument("--base", type=Path, help="base checkpoint (default: the path recorded in the store)")
    p.add_argument("--max-concurrency", type=int, default=ServerConfig.max_pending,
                   help="requests in flight (running + waiting) before 429 (default %(default)s)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (default: EngineConfig.max_batch)")
    p.add_argument("--max-context", type=int, help="prompt + generated tokens per request (default: the model's, "
                                                   "at most 4096)")
    p.add_argument("--max-prompt-tokens", type=int, help="largest prompt in tokens (default: the context)")
    p.add_argument("--max-tokens", type=int, default=ServerConfig.max_tokens,
                   help="largest max_tokens a request may ask for (default %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=ServerConfig.max_body_bytes,
                   help="413 above this (default %(default)s)")
    p.add_argument("--body-timeout", type=float, default=ServerConfig.body_timeout_s,
                   help="408 if a body takes longer (seconds, default %(default)s)")
    p.add_argument("--max-resident-bytes", type=int, help="memory budget for expert deltas (default: no limit)")
    p.add_argument("--backend", help="delta backend: auto (default: the fastest that runs here), lowbit, int4, pytorch, dense, reference or triton (docs/engine.md)")
    p.add_argument("--base-weights", choices=["auto", "gguf", "dense"],
                   help="how the base holds its weights: auto (default: the GGUF file's own Q4_1/Q8_0 blocks "
                        "where they equal the checkpoint's weights, docs/engine.md), gguf (the same, or fail), "
                        "dense (the checkpoint as loaded)")
    p.add_argument("--base-gguf", type=Path, help="the GGUF file the base came from (default: the packaged "
                                                  "SmolLM2 file)")
    p.add_argument("--base-model-id", help="also serve the base model alone under this model id (e.g. the base's "
                   "name; listed by /v1/models; default: not served)")
    p.add_argument("--no-router", action="store_true", help="serve without routing even if the store has a router")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    r = p.add_argument_group("Ray Serve (docs/ray.md)")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve: the ingress and router over engine replicas")
    r.add_argument("--replicas", type=int, default=RayAppConfig.replicas,
                   help="engine replicas, each with the base loaded (default %(default)s)")
    r.add_argument("--experts-per-replica", type=int, help="experts a replica holds at once (default: all); "
                                                           "requests go to a replica holding theirs")
    r.add_argument("--replica-cpus", type=float, default=RayAppConfig.replica_cpus,
                   help="Ray CPUs reserved per replica (default %(default)s)")
    r.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.set_defaults(func=cmd_serve)


def engine_config(args: argparse.Namespace):
    """EngineConfig from the flags; those not given keep EngineConfig's defaults."""
    from meswitch.engine import EngineConfig

    given = {"max_batch": args.max_batch, "max_context": args.max_context, "max_prompt_tokens": args.max_prompt_tokens,
             "max_resident_bytes": args.max_resident_bytes, "backend": args.backend,
             "base_weights": args.base_weights, "base_gguf": None if args.base_gguf is None else str(args.base_gguf)}
    return EngineConfig(max_waiting=max(args.max_concurrency, 1), **{k: v for k, v in given.items() if v is not None})


def server_config(args: argparse.Namespace):
    from meswitch.server.config import ServerConfig, api_key_from_env

    return ServerConfig(api_key=api_key_from_env(args.api_key), max_tokens=args.max_tokens,
                        max_pending=args.max_concurrency, max_body_bytes=args.max_body_bytes,
                        body_timeout_s=args.body_timeout, base_model_id=args.base_model_id)


def ray_config(args: argparse.Namespace):
    from meswitch.ray_app.config import RayAppConfig

    batch = RayAppConfig.max_batch if args.max_batch is None else args.max_batch
    return RayAppConfig(
        store=str(args.store), base=None if args.base is None else str(args.base), replicas=args.replicas,
        experts_per_replica=args.experts_per_replica, replica_cpus=args.replica_cpus, router=not args.no_router,
        max_ongoing_requests=max(batch * 2, 1), max_batch=batch, max_context=args.max_context,
        max_prompt_tokens=args.max_prompt_tokens, max_resident_bytes=args.max_resident_bytes,
        backend=args.backend or RayAppConfig.backend, base_weights=args.base_weights or RayAppConfig.base_weights,
        base_gguf=None if args.base_gguf is None else str(args.base_gguf), api_key=args.api_key,
        max_tokens=args.max_tokens, max_pending=args.max_concurrency, max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout, base_model_id=args.base_model_id)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray:
        from meswitch.ray_app.launch import run

        run(ray_config(args), host=args.host, port=args.port, address=args.ray_address)
        return 0
    from meswitch.server.app import serve

    serve(args.store, host=args.host, port=args.port, config=server_config(args), engine_config=engine_config(args),
          base=args.base, router=not args.no_router, log_level=args.log_level)
    return 0
