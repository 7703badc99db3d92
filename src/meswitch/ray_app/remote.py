"""The ingress's client of the engine replicas: an :class:`~meswitch.engine.client.EngineClient` over Ray Serve.

:class:`RemoteEngine` takes requests that already name their expert (the ingress's front routed
``auto``) and sends each to the replicas through a Serve handle, with the expert as the multiplexed
model id. The replica's stream is pumped into an ordinary :class:`RequestHandle`, so the HTTP layer
(errors, SSE, disconnects) is the single-process server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from meswitch.engine.client import Admitted, RequestHandle
from meswitch.engine.errors import EngineOverloadedError, EngineStoppedError, UnknownModelError
from meswitch.engine.request import Completion, Request, StreamEvent, Usage
from meswitch.ray_app.messages import Accepted, RemoteError

log = logging.getLogger(__name__)


class RemoteHandle(RequestHandle):
    """A request's handle at the ingress; ``replica`` names the engine replica that runs it."""

    replica: str | None = None


class RemoteEngine:
    """Forwards requests for ``experts`` to the engine replicas behind ``replicas`` (a Serve DeploymentHandle)."""

    def __init__(self, replicas: Any, experts: list[str], max_pending: int | None = None):
        self.replicas = replicas
        self.max_pending = max_pending
        self._experts = list(experts)
        self._pending = 0
        self._stopping = False
        self._tasks: dict[str, asyncio.Task[None]] = {}

    @property
    def experts(self) -> list[str]:
        return list(self._experts)

    @property
    def alive(self) -> bool:
        return not self._stopping

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> RemoteEngine:
        """Nothing to start: the replicas are Serve's."""
        return self

    def shutdown(self) -> None:
        self._stopping = True
        for task in list(self._tasks.values()):
            task.cancel()

    def stats(self) -> Future[dict[str, Any] | None]:
        """None: the engines' stats are per replica (ask a replica's ``info()``)."""
        fut: Future[dict[str, Any] | None] = Future()
        fut.set_result(None)
        return fut

    def submit_nowait(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> tuple[
            RequestHandle, Future[Admitted]]:
        """As :meth:`BackgroundEngine.submit_nowait`, from a running event loop (``loop``).

        ``request.expert`` must be one of the experts (a replica is chosen by it) or None (the base, any replica).
        """
        if loop is None:
            raise TypeError("RemoteEngine.submit_nowait needs the event loop the handle will be iterated on")
        if self._stopping:
            raise EngineStoppedError("the ingress is shutting down")
        if request.expert is not None and request.expert not in self._experts:
            raise UnknownModelError(str(request.expert), self._experts, also=())
        if self.max_pending is not None and self._pending >= self.max_pending:
            raise EngineOverloadedError(f"{self._pending} requests in flight (max {self.max_pending})")
        self._pending += 1
        rid = request.request_id
        handle = RemoteHandle(rid, self.abort, loop)
        handle.route = request.route
        admitted: Future[Admitted] = Future()
        self._tasks[rid] = loop.create_task(self._pump(request, handle, admitted))
        return handle, admitted

    def stream(self, handle: RequestHandle) -> AsyncIterator[StreamEvent]:
        return handle.__aiter__()

    def abort(self, request_id: str) -> None:
        """Cancel the request's task (from any thread): its replica stream is cancelled with it."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def _pump(self, request: Request, handle: RemoteHandle, admitted: Future[Admitted]) -> None:
        """Send ``request`` to a replica holding its expert, and hand its stream to ``handle``."""
        stream = None
        ended = False  # the replica sent the completion (or refused): nothing left to cancel there
        try:
            options = {"multiplexed_model_id": request.expert} if request.expert is not None else {}
            stream = self.replicas.options(stream=True, **options).generate.remote(request)
            async for msg in stream:
                if isinstance(msg, RemoteError):
                    ended = True
                    admitted.set_exception(msg.exception())
                    return
                if isinstance(msg, Accepted):
                    handle.expert, handle.replica = msg.expert, msg.replica
                    admitted.set_result(Admitted(handle.request_id, msg.expert, request.route))
                elif isinstance(msg, StreamEvent):  # its completion carries request.route: the engine hands it back
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
