"""Routed generation from Python: an :class:`Engine` behind the front, for requests that may ask for ``"auto"``."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from meswitch.engine.engine import Engine, EngineConfig
from meswitch.engine.request import Completion, Request, StreamEvent
from meswitch.front.routers import Router, load_store_router
from meswitch.front.routing import Front
from meswitch.store import DeltaStore


class RoutedEngine:
    """Resolves each request with a :class:`Front` over ``engine``'s experts and ``router``, then runs it on ``engine``.

    Completions and events are the engine's; a routed request's :class:`Completion` carries the
    router's decision in ``route`` (None for requests that named their expert).
    """

    def __init__(self, engine: Engine, router: Router | None = None):
        self.engine = engine
        self.front = Front(engine.experts, router)

    @classmethod
    def from_store(
        cls, store: DeltaStore | str | os.PathLike, base: str | os.PathLike | None = None,
        config: EngineConfig | None = None, router: Router | Literal["auto"] | None = "auto",
    ) -> RoutedEngine:
        """:meth:`Engine.from_store` behind the front; ``router="auto"``: the store's router, if it has one."""
        engine = Engine.from_store(store, base=base, config=config)
        return cls(engine, load_store_router(engine.store) if router == "auto" else router)

    @property
    def experts(self) -> list[str]:
        return self.engine.experts

    def add_request(self, request: Request) -> str:
        """Route ``request`` and queue it on the engine; returns its id (step with ``engine.step()``)."""
        return self.engine.add_request(self.front.resolve(request))

    def generate(self, requests: Sequence[Request] | Request) -> list[Completion]:
        """Route ``requests``, then run them to completion together; completions in the order given."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        return self.engine.generate([self.front.resolve(r) for r in reqs])

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """Route ``request`` and yield its events as the engine produces them."""
        return self.engine.stream(self.front.resolve(request))

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()
