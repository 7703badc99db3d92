"""The labelled example that every layer shares, and its JSONL form.

A line is ``{"text": ..., "domain": ...}``: ``text`` is what a user sends (the router's input);
``response`` (optional) is a reference answer; ``source`` says which package it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from meswitch.errors import MeswitchError
from meswitch.utils.atomic import atomic_write_text


@dataclass(frozen=True)
class Example:
    text: str
    domain: str
    response: str = ""
    source: str = ""


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(asdict(e), ensure_ascii=False) + "\n" for e in examples))


def read_jsonl(path: Path) -> list[Example]:
    """Read labelled lines; every line needs a non-empty string ``text`` and ``domain``."""
    path = Path(path)
    out: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MeswitchError(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise MeswitchError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise MeswitchError(f"{path}:{no}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"]:
            raise MeswitchError(f"{path}:{no}: expected an object with a non-empty string 'text'")
        domain = row.get("domain", "")
        if not isinstance(domain, str):
            raise MeswitchError(f"{path}:{no}: 'domain' must be a string")
        out.append(
            Example(row["text"], domain, str(row.get("response", "") or ""), str(row.get("source", "") or ""))
        )
    return out
