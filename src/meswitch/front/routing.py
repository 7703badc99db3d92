"""The front: turns a request into the expert that serves it, and the router's decision, before any engine sees it.

A request names an expert, None (the base model) or ``"auto"``. Names are checked against the
experts served; ``"auto"`` goes to the router, which classifies :func:`route_text` of the request
and whose decision comes back as a :class:`Route`. The HTTP server and the Ray ingress resolve every
request here, then hand an engine client a request that names its expert.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from meswitch.engine.errors import EngineOverloadedError, UnknownModelError
from meswitch.engine.request import Request, Route
from meswitch.front.errors import RoutingUnavailableError
from meswitch.front.routers import Router
from meswitch.front.text import route_text

AUTO = "auto"  # the model name that asks the router to choose
ALSO_ACCEPTED = ("'auto' (routed)", "None (the base)")  # listed after the experts in UnknownModelError


class Front:
    """Resolves requests against ``experts`` (their names) with ``router`` (None: no ``"auto"``).

    ``max_queued``: requests that may wait for the router at once in :meth:`resolve_async`; beyond
    it, :class:`EngineOverloadedError` (None: no limit).
    """

    def __init__(self, experts: Sequence[str], router: Router | None = None, max_queued: int | None = None):
        self.experts = list(experts)
        self.router = router
        self.max_queued = max_queued
        self._queued = 0
        self._routing: ThreadPoolExecutor | None = None

    @property
    def routed(self) -> bool:
        """True when ``"auto"`` can be served."""
        return self.router is not None

    def models(self) -> list[str]:
        """The names a request may give: every expert, then ``"auto"`` when there is a router."""
        return self.experts + ([AUTO] if self.routed else [])

    def decide(self, request: Request) -> tuple[str | None, Route | None]:
        """(the expert's name or None for the base, the router's decision or None) for ``request``.

        Blocking: asks the router for ``"auto"``. Raises :class:`RoutingUnavailableError` for
        ``"auto"`` without a router and :class:`UnknownModelError` (listing the experts) for a name
        that is not one of them.
        """
        name = request.expert
        if name == AUTO:
            if self.router is None:
                raise RoutingUnavailableError("expert 'auto' needs a router: train one with `meswitch router train`")
            d = self.router.route([route_text(request)])[0]
            route = Route(d.expert, d.domain, float(d.confidence), bool(d.fallback), tuple(getattr(d, "warnings", ())))
            return route.expert, route
        if name is not None and name not in self.experts:
            raise UnknownModelError(str(name), self.experts, also=ALSO_ACCEPTED)
        return name, None

    def resolve(self, request: Request) -> Request:
        """``request`` as an engine takes it: a copy naming the chosen expert, its ``route`` set when routed."""
        name, route = self.decide(request)
        return dataclasses.replace(request, expert=name, route=route)

    async def resolve_async(self, request: Request) -> Request:
        """:meth:`resolve` from an event loop: the router runs on the front's own thread, one request at a time."""
        if request.expert != AUTO or self.router is None:
            return self.resolve(request)  # no routing: nothing blocks
        if self.max_queued is not None and self._queued >= self.max_queued:
            raise EngineOverloadedError(f"{self._queued} requests are waiting for the router (max {self.max_queued})")
        if self._routing is None:
            self._routing = ThreadPoolExecutor(1, thread_name_prefix="meswitch-route")
        self._queued += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._routing, self.resolve, request)
        finally:
            self._queued -= 1

    def close(self) -> None:
        """Stop the routing thread; requests still waiting for it are cancelled."""
        if self._routing is not None:
            self._routing.shutdown(wait=False, cancel_futures=True)
            self._routing = None
