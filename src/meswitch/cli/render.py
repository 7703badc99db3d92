"""Printing results: JSON for scripts, rich tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    fmt = lambda c: (f"{c:.2e}" if 0 < abs(c) < 0.01 else f"{c:.3f}") if isinstance(c, float) else str(c)  # noqa: E731
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(c) for c in row))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
