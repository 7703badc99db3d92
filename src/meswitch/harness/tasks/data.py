"""The tiny local data sets of meswitch's lm-evaluation-harness tasks (no download): each YAML here loads its
``*.jsonl`` next to this file through ``custom_dataset: !function data.<name>``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def _split(name: str) -> dict[str, Any]:
    from datasets import Dataset

    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return {"test": Dataset.from_list(rows)}


def multiple_choice(**_: Any) -> dict[str, Any]:
    """``mc.jsonl``: ``{question, choices, answer}`` (a log-likelihood task)."""
    return _split("mc.jsonl")


def generation(**_: Any) -> dict[str, Any]:
    """``gen.jsonl``: ``{question, answer}`` (a generate_until task)."""
    return _split("gen.jsonl")
