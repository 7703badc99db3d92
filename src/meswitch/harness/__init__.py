"""meswitch as an lm-evaluation-harness model, and the task runner behind ``meswitch eval tasks``.

- ``scoring``: log-likelihoods, rolling windows and generation on an :class:`~meswitch.engine.Engine`,
  every request of a call handed to the engine at once (no lm-eval needed);
- ``lm``: ``MeswitchLM``, registered as lm-eval's ``meswitch`` model (imports lm_eval: the ``eval`` extra);
- ``run``: :func:`run.evaluate_tasks` (simple_evaluate over meswitch's task suites) and the score table;
- ``python -m meswitch.harness ARGS``: lm-eval's own command line with ``meswitch`` registered
  and meswitch's tasks on the include path (the ``lm_eval`` command cannot import a third-party model).

Nothing here imports lm_eval until it is used: meswitch works without the extra.
"""

from __future__ import annotations

from typing import Any

from meswitch.errors import MissingPackageError


def require_lm_eval() -> None:
    """Raise :class:`MissingPackageError` unless lm-evaluation-harness is installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingPackageError("lm-eval", "task evaluation", 'pip install "meswitch[eval]"') from exc


def register() -> type:
    """Import ``MeswitchLM`` (registering lm-eval's ``meswitch`` model) and return it."""
    require_lm_eval()
    from meswitch.harness.lm import MeswitchLM

    return MeswitchLM


def __getattr__(name: str) -> Any:
    if name == "MeswitchLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
