"""``meswitch zoo build|path``: the reference experts."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    zoo = sub.add_parser("zoo", help="build or locate the reference expert zoo")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    build = zsub.add_parser("build", help="fine-tune the reference experts (cached; resumes after a kill)")
    build.add_argument("--size", choices=["full", "small"], default="full")
    build.add_argument("--out", type=Path, default=None, help="zoo directory (default: the cache)")
    build.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    build.set_defaults(func=cmd_build)

    path = zsub.add_parser("path", help="print where the zoo lives")
    path.add_argument("--size", choices=["full", "small"], default="full")
    path.set_defaults(func=lambda a: print(_zoo_dir(a.size)))


def _zoo_dir(size: str) -> Path:
    from meswitch.zoo.build import zoo_dir

    return zoo_dir(size)


def cmd_build(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json, print_table
    from meswitch.zoo.build import build_zoo

    report = build_zoo(args.size, args.out)
    if args.json:
        print_json(report)
        return 0
    domains = list(report["ppl"]["base"])
    rows = [[model, *(report["ppl"][model][d] for d in domains)] for model in report["ppl"]]
    print_table(f"perplexity on held-out text ({args.size} zoo)", ["model", *domains], rows)
    rows = [
        [name, report["delta_rel"][name], report["train_s"].get(name)] for name in report["delta_rel"]
    ]
    print_table("experts", ["expert", "|delta|/|W|", "train s"], rows)
    print(f"zoo: {report['paths']['root']}")
    return 0
