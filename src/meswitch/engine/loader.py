"""The background loader: one thread that reads and prepares experts while the engine computes.

:class:`ExpertLoader` runs a given ``stage(idx)`` (read an expert's file, decode and check its deltas,
build the delta backend's forms: everything but attaching them to the model, which stays on the engine's
thread) for the experts it is handed, one at a time, in the order they were submitted. The thread starts
on the first submission and ends after ``idle_s`` without work, so an idle engine holds no thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
THREAD_NAME = "meswitch-loader"


class ExpertLoader(Generic[T]):
    """Runs ``stage(idx)`` on a thread of its own; :meth:`submit` returns the future of its result."""

    def __init__(self, stage: Callable[[int], T], idle_s: float = 5.0) -> None:
        self._stage = stage
        self._idle_s = idle_s
        self._queue: queue.SimpleQueue[tuple[int, Future[T]]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _thread against a submit racing the thread's exit
        self._thread: threading.Thread | None = None

    def submit(self, idx: int) -> Future[T]:
        """Queue expert ``idx``; the future gives ``stage(idx)`` or the exception it raised."""
        fut: Future[T] = Future()
        with self._lock:
            self._queue.put((idx, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        return fut

    @property
    def running(self) -> bool:
        """Whether the loader's thread is alive now."""
        t = self._thread
        return t is not None and t.is_alive()

    def _run(self) -> None:
        while True:
            try:
                idx, fut = self._queue.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._stage(idx))
            except BaseException as exc:  # noqa: BLE001 - handed to the engine, which fails the expert's requests
                fut.set_exception(exc)
