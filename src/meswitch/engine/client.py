"""How a front end drives an engine it does not own: the :class:`EngineClient` protocol and its handles.

A client takes requests that already name their expert (or None: the base); choosing an expert for
``"auto"`` happens before, in :mod:`meswitch.front`. Two implementations:
:class:`~meswitch.engine.background.BackgroundEngine` (an :class:`Engine` stepped on a thread of this
process) and :class:`~meswitch.ray_app.remote.RemoteEngine` (engine replicas behind a Ray Serve handle).
Each submitted request gets a :class:`RequestHandle` that receives its events, and a future that
resolves to :class:`Admitted` once the engine accepted it (or raises its validation error).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from meswitch.engine.request import Completion, Request, Route, StreamEvent


@dataclass(frozen=True)
class Admitted:
    """What is known when a request enters the engine: the expert it runs on and the router's decision."""

    request_id: str
    expert: str | None
    route: Route | None


class RequestHandle:
    """The events of one submitted request. Iterate it (``for``/``async for``) until the completion.

    ``loop``: the asyncio loop that will iterate it (events are handed over with
    ``loop.call_soon_threadsafe``); None for synchronous iteration on any thread.
    """

    def __init__(self, request_id: str, canceller: Callable[[str], None], loop: asyncio.AbstractEventLoop | None):
        self.request_id = request_id
        self.expert: str | None = None
        self.route: Route | None = None
        self.completion: Completion | None = None
        self._cancel = canceller
        self._loop = loop
        self._async_q: asyncio.Queue[StreamEvent] | None = asyncio.Queue() if loop is not None else None
        self._sync_q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()

    @property
    def finished(self) -> bool:
        return self.completion is not None

    def cancel(self) -> None:
        """Abort the request (no-op once finished); it ends with ``finish_reason="cancelled"``."""
        if self.completion is None:
            self._cancel(self.request_id)

    def _push(self, ev: StreamEvent) -> None:
        """Hand ``ev`` to the iterating side; called by the client (from any thread)."""
        if ev.completion is not None:
            self.completion = ev.completion
        if self._loop is None:
            self._sync_q.put(ev)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._async_q.put_nowait, ev)  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._loop is not None:
            raise TypeError("this handle was submitted from an event loop: use `async for`")
        while True:
            ev = self._sync_q.get()
            yield ev
            if ev.finished:
                return

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._async_q is None:
            raise TypeError("this handle was submitted without an event loop: use `for`")
        while True:
            ev = await self._async_q.get()
            yield ev
            if ev.finished:
                return

    async def result(self) -> Completion:
        """Wait (asynchronously) for the completion, discarding the intermediate events."""
        async for ev in self:
            if ev.completion is not None:
                return ev.completion
        raise AssertionError("unreachable: a handle always ends with a completion")


class EngineClient(Protocol):
    """What the HTTP server (:mod:`meswitch.server`) needs of an engine, wherever the engine runs."""

    @property
    def experts(self) -> list[str]:
        """The experts it serves, by name."""
        ...

    @property
    def alive(self) -> bool:
        """True while it takes requests."""
        ...

    @property
    def pending(self) -> int:
        """Requests submitted and not finished."""
        ...

    def start(self) -> EngineClient:
        """Start serving (idempotent); returns the client."""
        ...

    def shutdown(self) -> None:
        """Stop taking requests and end those in flight."""
        ...

    def submit_nowait(self, request: Request, loop: asyncio.AbstractEventLoop) -> tuple[
            RequestHandle, Future[Admitted]]:
        """Queue ``request`` (its expert a name or None) without blocking.

        Returns its handle, iterated on ``loop``, and a future that resolves to :class:`Admitted` or
        raises the engine's validation error. Raises ``EngineOverloadedError``/``EngineStoppedError``
        at once when the client takes no more requests.
        """
        ...

    def stream(self, handle: RequestHandle) -> AsyncIterator[StreamEvent]:
        """The events of a submitted request, the last one carrying its completion."""
        ...

    def abort(self, request_id: str) -> None:
        """Cancel a submitted request; it ends with ``finish_reason="cancelled"``."""
        ...

    def stats(self) -> Future[dict[str, Any] | None]:
        """The engine's counters and residency (``Engine.stats()``), or None where no single engine has them."""
        ...
