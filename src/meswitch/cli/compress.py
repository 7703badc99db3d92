"""``meswitch compress``, ``meswitch inspect`` and ``meswitch eval fidelity`` (``eval tasks``: :mod:`.eval_tasks`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from meswitch.errors import MeswitchError


def _expert_arg(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    return name, Path(path)


def _salient_arg(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--salient takes a count K or a fraction in (0, 1), got {value!r}") from None
    if v <= 0 or (v >= 1 and v != int(v)):
        raise argparse.ArgumentTypeError(f"--salient takes a count K >= 1 or a fraction in (0, 1), got {value!r}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    from meswitch.cli import eval_tasks
    from meswitch.compress.config import CompressConfig

    d = CompressConfig()
    p = sub.add_parser("compress", help="compress experts into a delta store")
    p.add_argument("--zoo", choices=["full", "small"], help="take base, experts and calibration text from a zoo")
    p.add_argument("--base", type=Path, help="base model checkpoint directory")
    p.add_argument("--expert", type=_expert_arg, action="append", default=[], metavar="NAME=DIR",
                   help="a fine-tuned checkpoint, or a PEFT LoRA adapter directory (adapter_config.json + "
                   "adapter_model.safetensors: stored as its 16-bit factors, no calibration)")
    p.add_argument("--out", type=Path, required=True, help="store directory (created, or added to)")
    p.add_argument("--method", choices=["salient", "gptq", "gptq-mixed", "mixed", "sign2d", "rtn", "bitdelta",
                                        "lowrank"],
                   default=d.method, help="gptq: rtn's grid, codes chosen with error feedback; the mixed "
                   "methods spend --target-bits over the matrices; lowrank: each matrix's truncated SVD in "
                   "16-bit factors, at --rank or sized by --target-bits (default %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank,
                   help="lowrank only: the rank of every matrix (default: the largest rank per matrix within "
                   "--target-bits, 1.5 unless given)")
    p.add_argument("--bits", type=int, choices=[1, 2, 3, 4], default=d.bits)
    p.add_argument("--salient", type=_salient_arg, default=d.salient,
                   help="salient columns per matrix: a count K or a fraction (default: fit --target-bits)")
    p.add_argument("--target-bits", type=float, default=d.target_bits,
                   help="bits per delta parameter: what the mixed methods spend, and what sizes K for "
                   "salient when --salient is not given (default: 1.5 for the mixed methods, else 2.1)")
    p.add_argument("--asymmetric", action="store_true", help="min/max grid with a zero point per row")
    p.add_argument("--clip-ratio", type=float, default=d.clip_ratio,
                   help="grid extent as a fraction of each row's absmax (default: 0.7 at 2 bits, else 1.0)")
    p.add_argument("--calib", type=Path, help="calibration JSONL ({'text', 'domain'[, 'response']})")
    p.add_argument("--distill-steps", type=int, default=d.distill_steps,
                   help="steps of step-size distillation (default: 20 for gptq-mixed, else 0)")
    p.add_argument("--distill-lr", type=float, default=d.distill_lr, help=f"its Adam learning rate ({d.distill_lr:g})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("inspect", help="what a store holds: bits per parameter, bytes, ratio, fidelity")
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    ev = sub.add_parser("eval", help="evaluate a store")
    esub = ev.add_subparsers(dest="eval_command", required=True, metavar="WHAT")
    p = esub.add_parser("fidelity", help="compressed expert against the uncompressed one on held-out text")
    p.add_argument("store", type=Path)
    p.add_argument("--expert", required=True)
    p.add_argument("--base", type=Path, help="base checkpoint (default: the path recorded in the store)")
    p.add_argument("--reference", type=Path, help="uncompressed expert (default: the path recorded in the store)")
    p.add_argument("--text", type=Path, required=True, help="JSONL of held-out examples")
    p.add_argument("--limit", type=int, default=64, help="examples to score (default 64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fidelity)
    eval_tasks.register(esub)


def _resolve_inputs(args: argparse.Namespace) -> tuple[Path, dict[str, Path], Path | dict[str, Path] | None]:
    """Base, experts, and calibration text: ``--calib`` for every expert, else with ``--zoo`` each
    zoo expert's own domain text (others get the zoo's whole training split); None when every expert
    is a LoRA adapter, which needs none."""
    from meswitch.jobs.peft_adapter import is_adapter
    from meswitch.zoo.build import ZooPaths, expert_calibration, zoo_dir
    from meswitch.zoo.recipe import get_recipe

    experts = dict(args.expert)
    base, calib = args.base, args.calib
    if args.zoo:
        paths = ZooPaths(zoo_dir(args.zoo))
        base = base or paths.base
        if calib is None:
            own = expert_calibration(args.zoo, paths)
            calib = {n: own.get(n, paths.split(None, "train")) for n in (experts or own)}
        if not experts:
            experts = {n: paths.expert(n) for n, _ in get_recipe(args.zoo).experts}
    if base is None or not experts:
        raise MeswitchError("give --base DIR and at least one --expert NAME=DIR (or --zoo full|small)")
    if calib is None and all(is_adapter(p) for p in experts.values()):
        return Path(base), experts, None
    if calib is None:
        guess = Path(base).parent / "data" / "train.jsonl"
        if not guess.is_file():
            raise MeswitchError("no calibration text: pass --calib FILE.jsonl")
        calib = guess
    return Path(base), experts, calib if isinstance(calib, dict) else Path(calib)


def cmd_compress(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json
    from meswitch.compress.config import CompressConfig
    from meswitch.data.examples import read_jsonl
    from meswitch.jobs.compress_store import compress_into_store
    from meswitch.utils.memory import map_large_allocations

    if not args.distill_lr > 0:  # also refuses NaN
        raise MeswitchError(f"--distill-lr must be a positive learning rate, got {args.distill_lr}")
    # freed activations, and the codes distillation unpacks per matrix (up to ~0.9 MB each), leave the
    # process instead of fragmenting its heap (docs/compression.md: -65 MB at a distillation step's peak)
    map_large_allocations(256 << 10)
    base, experts, calib = _resolve_inputs(args)
    bits = {"bitdelta": 1, "lowrank": 16}.get(args.method, args.bits)  # lowrank: its factors' width
    cfg = CompressConfig(
        method=args.method, bits=bits, salient=args.salient, target_bits=args.target_bits,
        symmetric=not args.asymmetric, clip_ratio=args.clip_ratio, distill_steps=args.distill_steps,
        distill_lr=args.distill_lr, rank=args.rank,
    )
    examples = ({n: read_jsonl(p) for n, p in calib.items()} if isinstance(calib, dict)
                else None if calib is None else read_jsonl(calib))
    results = compress_into_store(base, experts, args.out, examples, cfg)
    if args.json:
        print_json({"store": str(args.out), "experts": results})
    else:
        cmd_inspect(argparse.Namespace(store=args.out, json=False))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json, print_table
    from meswitch.store.summary import summarize

    summary = summarize(args.store)
    served = _served_base(args.store)
    if served is not None:
        summary["footprint"]["base_served"] = served
    routers = _routers(args.store)
    if routers is not None:
        summary["routers"] = routers
    if args.json:
        print_json(summary)
        return 0
    rows = []
    for name, e in summary["experts"].items():
        f = e.get("fidelity", {})
        method = f"lora r={e['rank']}" if e.get("kind") == "lora" else e["method"]
        every = e.get("bits_per_param_all")
        rows.append([name, method, e["bits"], e["bits_per_param"], "-" if every is None else round(every, 3),
                     f"{e['bytes'] / 2**20:.2f} MiB",
                     f"{e['ratio_vs_fp16']:.1f}x", f.get("kl", "-"), f.get("top1", "-"), f.get("ppl_ratio", "-")])
    print_table(f"store {args.store}", ["expert", "method", "bits", "bits/param", "all bits/param", "bytes", "vs fp16",
                                        "KL", "top-1", "ppl ratio"], rows)
    fp = summary["footprint"]
    print(f"footprint: base + {fp['experts']} compressed experts = {fp['store_bytes'] / 2**20:.1f} MiB "
          f"vs {fp['experts']} fp16 experts = {fp['fp16_experts_bytes'] / 2**20:.1f} MiB "
          f"({fp['ratio']:.2f}x smaller)")
    served = fp.get("base_served")
    if served is not None and served["served"] < served["dense"]:
        print(f"base in memory: {served['served'] / 2**20:.1f} MiB served from {served['gguf']}'s blocks "
              f"(meswitch serve's default, values checked at start-up) vs {served['dense'] / 2**20:.1f} MiB as loaded")
    if routers:
        print_table("routers", ["encoder", "active", "domain -> expert", "fallback", "threshold", "val acc", "status"],
                    [[k, "yes" if r["active"] else "", ", ".join(f"{d}->{e}" for d, e in (r["domain_map"] or {}).items()),
                      r["fallback"], r.get("threshold", "-"), r.get("val_accuracy", "-"), r.get("error", "ok")]
                     for k, r in routers.items()])
    return 0


def _served_base(store: Path) -> dict | None:
    """The base's bytes as loaded and as the engine serves it by default (``base_weights="auto"``: the
    packaged GGUF's blocks, :func:`meswitch.model.gguf_blocks.served_bytes`); None when the store records no
    base directory that exists here, or the GGUF package is not installed."""
    from meswitch.model.checkpoint import packaged_gguf_if_installed
    from meswitch.model.gguf_blocks import served_bytes
    from meswitch.store import DeltaStore

    base = DeltaStore.open(store).extra.get("base_path")
    gguf = packaged_gguf_if_installed()
    if not base or not Path(base).is_dir() or gguf is None:
        return None
    return {"gguf": gguf.name, **served_bytes(Path(base), gguf)}


def _routers(store: Path) -> dict | None:
    """The store's routers (``meswitch.router``), or None when the router package is unavailable."""
    try:
        from meswitch.router.router import describe_routers
    except ImportError:
        return None
    from meswitch.store import DeltaStore

    return describe_routers(DeltaStore.open(store))


def cmd_fidelity(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json, print_table
    from meswitch.data.examples import read_jsonl
    from meswitch.jobs.store_fidelity import store_fidelity

    examples = read_jsonl(args.text)[: args.limit]
    if not examples:
        raise MeswitchError(f"{args.text}: no examples")
    result = store_fidelity(args.store, args.expert, examples, base_dir=args.base, reference_dir=args.reference)
    if args.json:
        print_json(result)
    else:
        print_table(f"fidelity of {args.expert!r} ({result['tokens']} tokens)",
                    ["kl", "top1", "ppl_ratio", "bits_per_param"],
                    [[result["kl"], result["top1"], result["ppl_ratio"], result["bits_per_param"]]])
    return 0
