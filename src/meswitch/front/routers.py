"""The router the front asks: any object with ``route(texts) -> decisions``, and loading the store's own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meswitch.store import DeltaStore


class Decision(Protocol):
    """One routing decision, as ``meswitch.router.RouteDecision`` gives it."""

    expert: str
    domain: str
    confidence: float
    fallback: bool


class Router(Protocol):
    """What the front needs of a router: ``meswitch.router.Router``, or a stand-in in tests."""

    def route(self, texts: list[str]) -> Sequence[Decision]:
        """One decision per text, in order."""
        ...


def load_store_router(store: DeltaStore) -> Router | None:
    """``store``'s router, or None when it has none or the ``router`` extra is not installed.

    Raises what ``meswitch.router.load_router`` raises for a router made for another store or with
    corrupt files.
    """
    try:
        from meswitch.router import load_router
    except ImportError:
        return None
    return load_router(store)
