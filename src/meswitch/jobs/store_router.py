"""A store's router: the one it holds, else one trained in-process as ``meswitch router train STORE`` would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from meswitch.errors import MissingPackageError

if TYPE_CHECKING:
    from meswitch.router import Router

UNROUTED = "queries go to each domain's expert by name"


class RouterStep(NamedTuple):
    """What :func:`ensure_router` did: ``router`` is None when routing is unavailable."""

    router: Router | None
    trained: bool  # True: trained (and saved) now; False: reused from the store, or none


def _quiet(_msg: str) -> None:
    """The default ``say``: no progress messages."""


def train_default_router(store_path: Path, progress: bool = False) -> Router:
    """Train, save and activate the router ``meswitch router train STORE`` makes with its defaults.

    The ``minilm`` encoder and an MLP head (``RouterTrainConfig()``), trained on the zoo text the
    store's base came from plus the packaged multi-source corpus (``default_training_examples``),
    each domain routed to the expert of the same name.
    """
    from meswitch.router.train import RouterTrainConfig, default_training_examples, train_router
    from meswitch.store import DeltaStore

    store = DeltaStore.open(store_path)
    examples = default_training_examples(store)
    router = train_router(store, examples, RouterTrainConfig(), domain_map={}, progress=progress)
    router.save(store, activate=True)
    return router


def ensure_router(store_path: Path, say: Callable[[str], None] = _quiet, progress: bool = False) -> RouterStep:
    """The store's active router, or, when it has none, :func:`train_default_router`'s.

    When the router cannot run here (``meswitch.router`` or the router extra's packages missing)
    the reason goes to ``say`` and the step has no router. ``progress``: the encoder's progress bar.
    """
    try:
        from meswitch.router import load_router
    except ImportError:
        say(f"router: the meswitch.router package is not installed; {UNROUTED}")
        return RouterStep(None, False)
    from meswitch.store import DeltaStore

    try:
        router = load_router(DeltaStore.open(store_path))
        if router is not None:
            say("router: reusing the store's router")
            return RouterStep(router, False)
        say(f"router: meswitch router train {store_path}")
        return RouterStep(train_default_router(store_path, progress), True)
    except MissingPackageError as exc:  # the router extra (its encoder's model package) is not installed
        say(f"router: {exc}; {UNROUTED}")
        return RouterStep(None, False)
