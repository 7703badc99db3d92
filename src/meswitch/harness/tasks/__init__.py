"""Tiny lm-evaluation-harness tasks with local data (docs/server.md, "Evaluating with lm-evaluation-harness"):
``meswitch_tiny_mc`` (multiple choice, log-likelihood) and ``meswitch_tiny_gen`` (generate_until).
Pass :data:`TASKS_DIR` as lm_eval's ``--include_path``."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
