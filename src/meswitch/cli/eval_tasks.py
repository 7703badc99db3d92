"""``meswitch eval tasks STORE``: lm-evaluation-harness task scores of a store's expert, the base or ``auto``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meswitch.errors import MeswitchError


def register(esub: argparse._SubParsersAction) -> None:
    """Add ``tasks`` to the ``meswitch eval`` group."""
    p = esub.add_parser("tasks", help="lm-eval task scores (math word problems, HumanEval, multiple choice)")
    p.add_argument("store", type=Path)
    p.add_argument("--expert", default="base", help="an expert, 'auto' (routed per request) or 'base' (default)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="tasks or tags (comma or space separated; default: the meswitch suite, docs/evaluation.md)")
    p.add_argument("--limit", type=int, help="the first N documents of each task")
    p.add_argument("--base", type=Path, help="base checkpoint (default: the one the store records)")
    p.add_argument("--backend", default="auto", help="delta backend (docs/engine.md)")
    p.add_argument("--max-batch", type=int, default=16, help="the engine's batch (default 16)")
    p.add_argument("--no-chat-template", action="store_true", help="raw prompts instead of the chat template")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(func=cmd_eval_tasks)


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    from meswitch.cli.render import print_json, print_table
    from meswitch.harness import register as register_lm
    from meswitch.harness.run import check_tasks, evaluate_tasks, score_rows, task_manager

    if args.limit is not None and args.limit < 1:
        raise MeswitchError(f"--limit must be >= 1, got {args.limit}")
    if not args.store.is_dir():
        raise MeswitchError(f"no delta store at {args.store}: not a directory")
    lm_cls = register_lm()
    tasks = [t for part in (args.tasks or []) for t in part.split(",") if t] or None
    if tasks:
        check_tasks(tasks, task_manager())  # before loading any model
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    lm = lm_cls(store=str(args.store), expert=args.expert, base=None if args.base is None else str(args.base),
                backend=args.backend, max_batch=args.max_batch)
    results = evaluate_tasks(lm, tasks, limit=args.limit, chat_template=not args.no_chat_template)
    rows = score_rows(results)
    if args.json:
        print_json({"store": str(args.store), "expert": args.expert, "limit": args.limit, "scores": rows})
        return 0
    print_table(f"task scores of {args.expert!r} on {args.store}" + (f" (first {args.limit} per task)" if args.limit else ""),
                ["task", "metric", "value", "± stderr", "n"],
                [[r["task"], r["metric"] + ("" if r["filter"] in ("", "none") else f" ({r['filter']})"), r["value"],
                  "-" if r["stderr"] is None else r["stderr"], r["n"] if r["n"] is not None else "-"] for r in rows])
    return 0
