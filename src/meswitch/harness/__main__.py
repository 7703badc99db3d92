"""``python -m meswitch.harness [lm-eval arguments]``: lm-eval's command line with the ``meswitch`` model.

lm-eval finds models in its own registry only; this registers ``meswitch`` first, adds meswitch's task
directory to ``--include_path`` (unless one is given), then runs lm-eval's CLI, e.g.::

    python -m meswitch.harness --model meswitch --model_args store=STORE,expert=auto \\
        --tasks meswitch_mc_math --apply_chat_template --limit 20
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from meswitch.harness import register
    from meswitch.harness.tasks import TASKS_DIR

    register()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASKS_DIR)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
