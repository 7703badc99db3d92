"""Run an :class:`Engine` on a thread of its own, for callers on other threads or an asyncio loop.

The engine is not thread-safe, so only the background thread touches it. Other threads talk to it
through an inbox of operations (add a request, abort one, run a function on the engine) that the
thread drains between steps; events come back through a :class:`RequestHandle` per request, which
can be iterated synchronously or, when submitted from a running event loop, with ``async for``.
:class:`BackgroundEngine` is the in-process :class:`~meswitch.engine.client.EngineClient`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from meswitch.engine.client import Admitted, RequestHandle
from meswitch.engine.engine import Engine
from meswitch.engine.errors import EngineOverloadedError, EngineStoppedError
from meswitch.engine.request import Completion, Request, Route, StreamEvent, Usage

log = logging.getLogger(__name__)
T = TypeVar("T")


class BackgroundEngine:
    """Owns ``engine`` and steps it on a daemon thread while it has work.

    ``max_pending``: requests submitted and not finished (waiting + running + in the inbox) beyond
    which :meth:`submit` raises :class:`EngineOverloadedError` at once (None: only the engine's own
    ``max_waiting`` limits them).
    """

    def __init__(self, engine: Engine, max_pending: int | None = None, idle_wait_s: float = 0.5):
        self.engine = engine
        self._experts = list(engine.experts)
        self.max_pending = max_pending
        self._idle_wait = idle_wait_s
        self._inbox: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _pending and _stopping
        self._pending = 0
        self._stopping = False
        self._handles: dict[str, RequestHandle] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="meswitch-engine", daemon=True)
        self._started = False

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> BackgroundEngine:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, cancel those in flight (their handles end ``cancelled``) and join the thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(("stop", None, None))
        self._wake.set()
        if self._started:
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished."""
        return self._pending

    @property
    def experts(self) -> list[str]:
        """The engine's experts, by name."""
        return list(self._experts)

    # ---- API (any thread) ----------------------------------------------------------------------

    def submit_nowait(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> tuple[
            RequestHandle, Future[Admitted]]:
        """Queue ``request``; returns its handle and a future that resolves once the engine accepted it.

        The future raises the engine's validation error (``InvalidRequestError`` and subclasses) or
        ``EngineOverloadedError``. Raises ``EngineOverloadedError``/``EngineStoppedError`` at once when
        the pending limit is reached or the engine is stopping.
        """
        with self._lock:
            if self._stopping or not self._started:
                raise EngineStoppedError("the engine is not running")
            if self.max_pending is not None and self._pending >= self.max_pending:
                raise EngineOverloadedError(f"{self._pending} requests in flight (max {self.max_pending})")
            self._pending += 1
        handle = RequestHandle(request.request_id, self.abort, loop)
        fut: Future[Admitted] = Future()
        self._inbox.put(("add", (request, handle), fut))
        self._wake.set()
        return handle, fut

    def submit(self, request: Request, timeout: float | None = None) -> RequestHandle:
        """Blocking :meth:`submit_nowait` for synchronous callers: the handle once admitted (or the error)."""
        handle, fut = self.submit_nowait(request)
        fut.result(timeout)
        return handle

    async def submit_async(self, request: Request) -> RequestHandle:
        """:meth:`submit_nowait` from a coroutine: awaits admission; the handle supports ``async for``."""
        handle, fut = self.submit_nowait(request, asyncio.get_running_loop())
        await asyncio.wrap_future(fut)
        return handle

    def stream(self, handle: RequestHandle) -> AsyncIterator[StreamEvent]:
        """The events of a handle submitted from an event loop (``async for``)."""
        return handle.__aiter__()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def stats(self) -> Future[dict[str, Any] | None]:
        """``Engine.stats()``, taken on the engine thread between steps."""
        return self.call(lambda e: e.stats())

    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread between steps (e.g. ``lambda e: e.stats()``)."""
        fut: Future[T] = Future()
        if not self._thread.is_alive():
            fut.set_exception(EngineStoppedError("the engine is not running"))
            return fut
        self._inbox.put(("call", fn, fut))
        self._wake.set()
        return fut

    # ---- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._drain():
                break
            if self.engine.has_unfinished():
                try:
                    events = self.engine.step()
                except Exception as exc:  # noqa: BLE001 - one broken step must not kill the server
                    log.exception("engine step failed")
                    events = self._fail_all(exc)
                for ev in events:
                    self._dispatch(ev)
            else:
                self._wake.wait(self._idle_wait)
                self._wake.clear()
        self._cancel_all()

    def _drain(self) -> bool:
        """Apply every queued operation; False once asked to stop."""
        while True:
            try:
                op, arg, fut = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if op == "stop":
                return False
            if op == "add":
                self._add(*arg, fut)
            elif op == "abort":
                if arg in self._handles:
                    self.engine.abort(arg)
            elif op == "call" and fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(arg(self.engine))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

    def _add(self, request: Request, handle: RequestHandle, fut: Future[Admitted]) -> None:
        try:
            rid = self.engine.add_request(request)
        except Exception as exc:  # noqa: BLE001 - validation errors go back to the submitter
            self._release()
            fut.set_exception(exc)
            return
        handle.expert, handle.route = _admitted(self.engine, rid)
        self._handles[rid] = handle
        fut.set_result(Admitted(rid, handle.expert, handle.route))

    def _dispatch(self, ev: StreamEvent) -> None:
        handle = self._handles.get(ev.request_id)
        if handle is None:
            return
        handle._push(ev)
        if ev.finished:
            del self._handles[ev.request_id]
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _fail_all(self, exc: Exception) -> list[StreamEvent]:
        """After an unexpected step failure: abort everything in the engine, end every handle with an error."""
        events = []
        for rid, h in list(self._handles.items()):
            self.engine.abort(rid)
            comp = Completion(rid, "", [], "error", h.expert, Usage(0, 0), h.route, f"{type(exc).__name__}: {exc}")
            events.append(StreamEvent(rid, "", [], comp))
        try:
            self.engine.step()  # reap the aborted requests, freeing their slots
        except Exception:  # noqa: BLE001
            log.exception("engine step failed again while cancelling")
        return events

    def _cancel_all(self) -> None:
        for rid in list(self._handles):
            self.engine.abort(rid)
        try:
            for ev in self.engine.step() if self._handles else []:
                self._dispatch(ev)
        except Exception:  # noqa: BLE001
            log.exception("engine step failed while shutting down")
        for rid, h in list(self._handles.items()):  # anything the step did not end
            self._dispatch(StreamEvent(rid, "", [], Completion(rid, "", [], "cancelled", h.expert, Usage(0, 0))))
        while True:  # requests that arrived after stop: refuse them
            try:
                op, arg, fut = self._inbox.get_nowait()
            except queue.Empty:
                return
            if fut is not None and not fut.done():
                if op == "add":
                    self._release()
                fut.set_exception(EngineStoppedError("the engine stopped"))


def _admitted(engine: Engine, request_id: str) -> tuple[str | None, Route | None]:
    """The expert and route of a just-added request (called on the engine thread, right after ``add_request``)."""
    return engine.describe_request(request_id)
