"""The ingress's side of the engine replicas, shaped like a :class:`BackgroundEngine` for ``OpenAIServing``.

:class:`RemoteEngine` offers what :class:`meswitch.server.serving.OpenAIServing` uses of a background
engine (``engine.experts``/``engine.router``, ``alive``, ``pending``, ``submit_nowait``, ``call``) but
routes ``auto`` requests itself and sends each request to the replicas through a Serve handle, with
the expert as the multiplexed model id. The replica's stream is pumped into an ordinary
:class:`RequestHandle`, so the HTTP layer (errors, SSE, disconnects) is the single-process server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from meswitch.engine.background import Admitted, EngineStoppedError, RequestHandle
from meswitch.engine.errors import EngineOverloadedError, RoutingUnavailableError, UnknownModelError
from meswitch.engine.request import AUTO, Completion, Request, Route, StreamEvent, Usage
from meswitch.ray_app.messages import Accepted, RemoteError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Catalog:
    """What the HTTP layer reads of an engine: the experts served and the router (None: no ``auto``)."""

    experts: list[str]
    router: Any


class RemoteHandle(RequestHandle):
    """A request's handle at the ingress; ``replica`` names the engine replica that runs it."""

    replica: str | None = None


def route_text(request: Request) -> str:
    """The text the router classifies, as the engine picks it: the prompt, or the last user message."""
    if request.prompt is not None:
        return request.prompt
    msgs = request.messages or []
    users = [m.get("content", "") for m in msgs if m.get("role") == "user"]
    return users[-1] if users else (msgs[-1].get("content", "") if msgs else "")


class RemoteEngine:
    """Routes and forwards requests to the engine replicas behind ``replicas`` (a Serve DeploymentHandle)."""

    def __init__(self, replicas: Any, experts: list[str], router: Any = None, max_pending: int | None = None):
        self.engine = Catalog(list(experts), router)
        self.replicas = replicas
        self.max_pending = max_pending
        self._pending = 0
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._routing = ThreadPoolExecutor(1, thread_name_prefix="meswitch-route")  # one router call at a time

    @property
    def alive(self) -> bool:
        return not self._stopping

    @property
    def pending(self) -> int:
        return self._pending

    def shutdown(self) -> None:
        self._stopping = True
        for task in list(self._tasks.values()):
            task.cancel()
        self._routing.shutdown(wait=False, cancel_futures=True)

    def call(self, fn: Callable[[Any], T]) -> Future[T]:
        """Engine calls (``/metrics`` asks for stats) have no single engine here: a failed future."""
        fut: Future[T] = Future()
        fut.set_exception(EngineStoppedError("the engines run in Ray Serve replicas; ask a replica's info()"))
        return fut

    def submit_nowait(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> tuple[
            RequestHandle, Future[Admitted]]:
        """As :meth:`BackgroundEngine.submit_nowait`, from a running event loop (``loop``)."""
        if loop is None:
            raise TypeError("RemoteEngine.submit_nowait needs the event loop the handle will be iterated on")
        if self._stopping:
            raise EngineStoppedError("the ingress is shutting down")
        if request.expert not in (AUTO, *self.engine.experts):
            raise UnknownModelError(str(request.expert), self.engine.experts)
        if request.expert == AUTO and self.engine.router is None:
            raise RoutingUnavailableError("expert 'auto' needs a router: train one with `meswitch router train`")
        if self.max_pending is not None and self._pending >= self.max_pending:
            raise EngineOverloadedError(f"{self._pending} requests in flight (max {self.max_pending})")
        self._pending += 1
        rid = request.request_id
        handle = RemoteHandle(rid, self._cancel, loop)
        admitted: Future[Admitted] = Future()
        self._tasks[rid] = loop.create_task(self._pump(request, handle, admitted))
        return handle, admitted

    def _cancel(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def _route(self, request: Request) -> Route | None:
        if request.expert != AUTO:
            return None
        loop = asyncio.get_running_loop()
        d = (await loop.run_in_executor(self._routing, self.engine.router.route, [route_text(request)]))[0]
        return Route(d.expert, d.domain, float(d.confidence), bool(d.fallback))

    async def _pump(self, request: Request, handle: RemoteHandle, admitted: Future[Admitted]) -> None:
        """Route, send to a replica holding the expert, and hand its stream to ``handle``."""
        stream = None
        ended = False  # the replica sent the completion (or refused): nothing left to cancel there
        try:
            route = await self._route(request)
            if route is not None:
                request = dataclasses.replace(request, expert=route.expert)
            handle.route = route
            stream = self.replicas.options(stream=True, multiplexed_model_id=request.expert).generate.remote(request)
            async for msg in stream:
                if isinstance(msg, RemoteError):
                    ended = True
                    admitted.set_exception(msg.exception())
                    return
                if isinstance(msg, Accepted):
                    handle.expert, handle.replica = msg.expert, msg.replica
                    admitted.set_result(Admitted(handle.request_id, msg.expert, route))
                elif isinstance(msg, StreamEvent):
                    if msg.completion is not None and route is not None:
                        msg = dataclasses.replace(msg, completion=dataclasses.replace(msg.completion, route=route))
                    ended = msg.finished
                    handle._push(msg)
                    if ended:
                        return
            raise EngineStoppedError("the replica's stream ended before the request finished")
        except asyncio.CancelledError:
            self._end(handle, admitted, "cancelled", None)
            raise
        except Exception as exc:  # noqa: BLE001 - a dead replica or a lost connection ends this request only
            log.warning("request %s failed on its replica: %s: %s", handle.request_id, type(exc).__name__, exc)
            self._end(handle, admitted, "error", exc)
        finally:
            if stream is not None and not ended:  # e.g. the client left: stop the replica's generation
                with contextlib.suppress(Exception):
                    stream.cancel()
            self._pending -= 1
            self._tasks.pop(handle.request_id, None)

    def _end(self, handle: RemoteHandle, admitted: Future[Admitted], reason: str, exc: Exception | None) -> None:
        """Finish ``handle`` (or fail its admission) after a cancellation or a replica failure."""
        if not admitted.done():
            if exc is None:
                admitted.cancel()
            else:
                admitted.set_exception(EngineStoppedError(f"the request could not be served: {type(exc).__name__}: {exc}"))
            return
        if handle.finished:
            return
        error = None if exc is None else f"the engine replica failed: {type(exc).__name__}: {exc}"
        comp = Completion(handle.request_id, "", [], reason, handle.expert, Usage(0, 0), handle.route, error)
        handle._push(StreamEvent(handle.request_id, "", [], comp))
