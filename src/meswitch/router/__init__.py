"""The router: sends each query to the expert of its domain, with calibrated confidence.

``load_router(store)`` -> ``Router`` (or None); ``router.route(texts, top_k)`` -> ``RouteDecision`` per
text. Train with ``meswitch.router.train.train_router`` (``meswitch router train``); evaluate with
``meswitch.router.eval.evaluate`` (``meswitch router eval``). See docs/router.md.
"""

from meswitch.router.errors import (
    CorruptRouterError,
    RouterDataError,
    RouterError,
    RouterMismatchError,
    UnmappedDomainError,
)
from meswitch.router.router import RouteDecision, Router, RouterConfig, load_router

__all__ = [
    "CorruptRouterError",
    "RouteDecision",
    "Router",
    "RouterConfig",
    "RouterDataError",
    "RouterError",
    "RouterMismatchError",
    "UnmappedDomainError",
    "load_router",
]
