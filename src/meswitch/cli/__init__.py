"""The ``meswitch`` command: a thin layer over the Python API. Heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from meswitch import __version__
from meswitch.errors import MeswitchError


def build_parser() -> argparse.ArgumentParser:
    from meswitch.cli import compress, demo, generate, router, serve, zoo

    parser = argparse.ArgumentParser(
        prog="meswitch", description="Serve many fine-tuned experts from one base model."
    )
    parser.add_argument("--version", action="version", version=f"meswitch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    zoo.register(sub)
    compress.register(sub)
    router.register(sub)
    generate.register(sub)
    serve.register(sub)
    demo.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MeswitchError as exc:
        print(f"meswitch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("meswitch: interrupted", file=sys.stderr)
        return 130
