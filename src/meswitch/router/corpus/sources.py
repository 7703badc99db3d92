"""The router corpus: labelled text from every packaged source that fits a domain, tagged by source.

``SOURCES`` maps a source name (the ``source`` field of its examples) to its domain and a loader
``(n, seed) -> list[Example]``. ``build_corpus(per_source, seed)`` draws at most ``per_source`` of
each (a cap, so no source dominates), drops texts already drawn from an earlier source, and caches
the result as JSONL under ``cache_root()/router-corpus`` (deterministic in ``per_source``, ``seed``
and the source list; a loader whose package or files are missing gives no examples, and its source
is left out).

Sources, by domain (31):

- math: seven families of reasoning-gym generators (word problems, arithmetic, algebra, geometry,
  calculus, number theory, counting/probability), templated analytic questions, contest-style
  problems, proof requests, story problems, conceptual questions and sympy-drawn LaTeX exercises;
- code: CodeIO task prose, CPython stdlib functions and stubs, third-party Python packages, C/C++,
  shell, JavaScript, SQL and other languages' files, chat-voice code requests, chatterbot's coding
  questions, ShareGPT requests for code in a named language;
- general: chitchat, chatterbot, ShareGPT prose, chat-voice writing/advice requests, prompts with
  formatting constraints, reading tasks over a packaged story, questions about the world.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from meswitch.data.examples import Example

CORPUS_VERSION = 3
Loader = Callable[[int, int], list[Example]]


@dataclass(frozen=True)
class Source:
    """One source of labelled text: its ``domain`` and ``load(n, seed)``."""

    domain: str
    load: Loader


# ------------------------------------------------------------------------------------------- math
GENERATOR_FAMILIES = {
    "reasoning_gym/arithmetic": ("basic_arithmetic", "decimal_arithmetic", "chain_sum", "decimal_chain_sum",
                                 "products", "fraction_simplification", "power_function"),
    "reasoning_gym/algebra": ("simple_equations", "polynomial_equations", "polynomial_multiplication",
                              "complex_arithmetic"),
    "reasoning_gym/geometry": ("simple_geometry", "advanced_geometry"),
    "reasoning_gym/calculus": ("simple_integration", "intermediate_integration"),
    "reasoning_gym/number_theory": ("gcd", "lcm", "prime_factorization", "count_primes", "count_bits",
                                    "base_conversion"),
    "reasoning_gym/counting": ("dice", "coin_flip", "number_sequence", "puzzle24", "countdown", "time_intervals",
                               "calendar_arithmetic", "leg_counting"),
}


def _generators(names: tuple[str, ...]) -> Loader:
    def load(n: int, seed: int) -> list[Example]:
        from meswitch.router.data import generator_examples

        return generator_examples(names, n, seed)

    return load


def _word_problems(n: int, seed: int) -> list[Example]:
    from meswitch.data.sources import math_examples

    return math_examples(n, seed)


def _analytic(n: int, seed: int) -> list[Example]:
    from meswitch.router.augment import analytic_math_questions

    return analytic_math_questions(n, seed)


# ------------------------------------------------------------------------------------------- code
_PROGRAM_ASKS = ("Write a Python program for this task.", "Write a function that solves the following.",
                 "Implement this in code:", "Can you code a solution to this problem?", "Write a program:",
                 "Task for a programmer:", "Write a script that does the following.",
                 "Solve this with code and explain the algorithm.")


def _codeio(n: int, seed: int) -> list[Example]:
    """CodeIO tasks under a request for a program: bare, the task prose often reads as a math or
    science question (CodeIO describes what a program computes), so the request is what makes it code."""
    from meswitch.data.sources import codeio_examples

    rng = random.Random(seed)
    rows = codeio_examples()
    rng.shuffle(rows)
    out = []
    for e in rows[:n]:
        task = e.text.split("\n\n", 1)[-1]
        ask = rng.choice(_PROGRAM_ASKS)
        out.append(Example(f"{ask}\n\n{task}" if rng.random() < 0.7 else f"{task}\n\n{ask}", "code"))
    return out


def _stdlib(n: int, seed: int) -> list[Example]:
    """CPython functions: the zoo's prompt without its preamble, the whole function, or a bare stub."""
    from meswitch.data.sources import stdlib_examples

    rng = random.Random(seed)
    rows = stdlib_examples()
    rng.shuffle(rows)
    out = []
    for e in rows[:n]:
        pick = rng.random()
        text = e.response if pick < 0.4 else e.text.split("\n\n", 1)[-1]
        out.append(Example(text, "code"))
    return out


def _code_requests(n: int, seed: int) -> list[Example]:
    from meswitch.data.sources import stdlib_examples
    from meswitch.router.augment import prose_code_requests
    from meswitch.router.data import code_requests, docstring_tasks

    rows = stdlib_examples()
    snippets = [e.response for e in rows if e.response.count("\n") <= 25 and len(e.response) <= 1200]
    half = n // 2
    return code_requests(rows, half, seed) + prose_code_requests(docstring_tasks(rows), snippets, n - half, seed + 1)


def _chatterbot_coding(n: int, seed: int) -> list[Example]:
    from meswitch.router.data import chatterbot_coding

    rows = chatterbot_coding()
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _sharegpt_code(n: int, seed: int) -> list[Example]:
    from meswitch.router.data import _CODE_ASK, _CODE_LANG, _sharegpt_records

    out = []
    for q, _a in _sharegpt_records():
        if 20 <= len(q) <= 800 and _CODE_ASK.search(q) and _CODE_LANG.search(q) and "```" not in q:
            out.append(Example(q, "code"))
            if len(out) >= 4 * n:
                break
    random.Random(seed).shuffle(out)
    return out[:n]


def _code_files(name: str) -> Loader:
    def load(n: int, seed: int) -> list[Example]:
        from meswitch.router.corpus import code_text

        return getattr(code_text, name)(n, seed)

    return load


# ---------------------------------------------------------------------------------------- general
def _shuffled(load: Callable[[], list[Example]]) -> Loader:
    def draw(n: int, seed: int) -> list[Example]:
        rows = load()
        random.Random(seed).shuffle(rows)
        return rows[:n]

    return draw


def _chitchat() -> list[Example]:
    from meswitch.data.sources import chitchat_examples

    return chitchat_examples()


def _chatterbot() -> list[Example]:
    from meswitch.data.sources import chatterbot_examples

    return chatterbot_examples()


_SOFTWARE = re.compile(r"\b(website|web ?site|web|apps?|computer\w*|machine learning|AI|proxy|network\w*|cloud|"
                       r"html|blockchain|crypto\w*|syntax|parser|grammar|neural|dataset|automata|backend|"
                       r"frontend|devops|saas|ethereum|smart contract)\b", re.I)


def _sharegpt_prose(n: int, seed: int) -> list[Example]:
    """ShareGPT prose that passes the zoo's filter and names no software topic (the zoo's filter alone
    lets through requests about programming, which are not general text)."""
    from meswitch.data.sources import sharegpt_examples
    from meswitch.router.data import _CODE_LANG, _TECH

    rows = [e for e in sharegpt_examples(5 * n)
            if not (_CODE_LANG.search(e.text) or _TECH.search(e.text) or _SOFTWARE.search(e.text))]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def _general_requests(n: int, seed: int) -> list[Example]:
    from meswitch.router.augment import prose_general_requests

    return prose_general_requests(n, seed)


def _constrained(n: int, seed: int) -> list[Example]:
    from meswitch.data.sources import chatterbot_examples, chitchat_examples
    from meswitch.router.augment import with_constraints

    rng = random.Random(seed)
    pool = chitchat_examples() + chatterbot_examples()
    rng.shuffle(pool)
    return with_constraints(pool[: 4 * n], n, seed)


def _templates(module: str, name: str) -> Loader:
    def load(n: int, seed: int) -> list[Example]:
        import importlib

        return getattr(importlib.import_module(module), name)(n, seed)

    return load


SOURCES: dict[str, Source] = {
    "reasoning_gym/word_problems": Source("math", _word_problems),
    **{name: Source("math", _generators(gens)) for name, gens in GENERATOR_FAMILIES.items()},
    "meswitch/analytic_math": Source("math", _analytic),
    "meswitch/competition": Source("math", _templates("meswitch.router.corpus.math_text", "competition_problems")),
    "meswitch/proofs": Source("math", _templates("meswitch.router.corpus.math_text", "proof_requests")),
    "meswitch/story_problems": Source("math", _templates("meswitch.router.corpus.math_text", "story_problems")),
    "meswitch/math_concepts": Source("math", _templates("meswitch.router.corpus.math_text", "math_concepts")),
    "sympy/latex": Source("math", _templates("meswitch.router.corpus.math_text", "symbolic_exercises")),
    "reasoning_gym/codeio": Source("code", _codeio),
    "cpython/stdlib": Source("code", _stdlib),
    "site-packages/python": Source("code", _code_files("python_packages")),
    "files/c-cpp": Source("code", _code_files("c_family")),
    "files/shell": Source("code", _code_files("shell")),
    "files/javascript": Source("code", _code_files("javascript")),
    "files/sql": Source("code", _code_files("sql")),
    "files/other-languages": Source("code", _code_files("other_languages")),
    "meswitch/code_request": Source("code", _code_requests),
    "chatterbot_corpus/coding": Source("code", _chatterbot_coding),
    "sharegpt/code_request": Source("code", _sharegpt_code),
    "chitchat_dataset": Source("general", _shuffled(_chitchat)),
    "chatterbot_corpus/general": Source("general", _shuffled(_chatterbot)),
    "sharegpt/prose": Source("general", _sharegpt_prose),
    "meswitch/general_request": Source("general", _general_requests),
    "meswitch/constrained": Source("general", _constrained),
    "gutenberg/tasks": Source("general", _templates("meswitch.router.corpus.general_text", "fiction_tasks")),
    "meswitch/knowledge": Source("general", _templates("meswitch.router.corpus.general_text", "knowledge_questions")),
}

# Cheap sources (no file scans, no ShareGPT, no slow generators): for tests and quick checks.
QUICK_SOURCES = ("meswitch/competition", "meswitch/proofs", "reasoning_gym/arithmetic", "meswitch/code_request",
                 "chatterbot_corpus/coding", "reasoning_gym/codeio", "meswitch/knowledge",
                 "meswitch/general_request", "chatterbot_corpus/general")


def draw_source(name: str, n: int, seed: int) -> list[Example]:
    """At most ``n`` distinct non-empty examples of source ``name``, tagged ``source=name``, response dropped.

    A source whose package or files are missing here gives ``[]``.
    """
    from meswitch.errors import MissingPackageError

    src = SOURCES[name]
    offset = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)  # each source its own stream
    try:
        rows = src.load(n, seed * 1_000_003 + offset)
    except (MissingPackageError, ImportError, OSError):
        return []
    seen: set[str] = set()
    out = []
    for e in rows:
        text = e.text.strip()
        if text and text not in seen:
            seen.add(text)
            out.append(Example(text, src.domain, "", name))
    return out[:n]


def corpus_path(per_source: int, seed: int, sources: Sequence[str]) -> Path:
    from meswitch.paths import cache_root

    key = hashlib.sha256(f"{CORPUS_VERSION}|{per_source}|{seed}|{','.join(sources)}".encode()).hexdigest()[:16]
    return cache_root() / "router-corpus" / f"corpus-{key}.jsonl"


def build_corpus(per_source: int = 300, seed: int = 0, sources: Sequence[str] | None = None,
                 cache: bool = True) -> list[Example]:
    """At most ``per_source`` examples of each source (all of ``SOURCES`` by default), in source order;
    a text drawn by an earlier source is not repeated. Cached (``corpus_path``) when ``cache``."""
    from meswitch.data.examples import read_jsonl, write_jsonl

    names = list(sources or SOURCES)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus sources {unknown}; known: {sorted(SOURCES)}")
    path = corpus_path(per_source, seed, names)
    if cache and path.is_file():
        return read_jsonl(path)
    seen: set[str] = set()
    out: list[Example] = []
    for name in names:
        for e in draw_source(name, per_source, seed):
            if e.text not in seen:
                seen.add(e.text)
                out.append(e)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, out)
    return out


def split_by_source(examples: Sequence[Example], test_fraction: float, seed: int) -> tuple[list[Example],
                                                                                           list[Example]]:
    """``(train, test)``: ``test_fraction`` of each source's examples (at least one) held out, seeded."""
    rng = random.Random(seed)
    by: dict[str, list[Example]] = {}
    for e in examples:
        by.setdefault(e.source, []).append(e)
    train, test = [], []
    for name in sorted(by):
        rows = list(by[name])
        rng.shuffle(rows)
        k = max(1, round(len(rows) * test_fraction))
        test += rows[:k]
        train += rows[k:]
    return train, test
