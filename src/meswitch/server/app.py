"""The ASGI app: :func:`create_app` over an engine client, :func:`engine_app` over an in-process
:class:`Engine`, and :func:`serve` (load a store, run uvicorn)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from meswitch.engine.background import BackgroundEngine
from meswitch.engine.client import EngineClient
from meswitch.engine.engine import Engine, EngineConfig
from meswitch.front.routers import Router, load_store_router
from meswitch.front.routing import Front
from meswitch.server.config import DEFAULT_HOST, DEFAULT_PORT, ServerConfig
from meswitch.server.metrics import ServerMetrics
from meswitch.server.routes import build_app
from meswitch.server.serving import OpenAIServing


def create_app(client: EngineClient, front: Front | None = None, config: ServerConfig | None = None,
               owned: bool = False) -> FastAPI:
    """The OpenAI-compatible app over ``client``; ``front`` resolves ``model`` (None: the client's experts
    by name, no ``auto``).

    The app's lifespan starts ``client`` (if not started yet); ``owned``: it also shuts ``client``
    down and closes ``front`` when the app stops.
    """
    config = config or ServerConfig()
    front = front or Front(client.experts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client.start()
        try:
            yield
        finally:
            if owned:
                client.shutdown()
                front.close()

    serving = OpenAIServing(client, front, config, ServerMetrics())
    app = build_app(serving, config, lifespan)
    app.state.engine = client
    app.state.front = front
    return app


def engine_app(engine: Engine, router: Router | None = None, config: ServerConfig | None = None) -> FastAPI:
    """The app over ``engine``, run on a :class:`BackgroundEngine` that starts and stops with the app.

    ``router`` serves ``model="auto"`` (None: experts by name only); requests beyond
    ``config.max_pending`` in flight, or waiting for the router, get 429.
    """
    config = config or ServerConfig()
    client = BackgroundEngine(engine, max_pending=config.max_pending)
    return create_app(client, Front(engine.experts, router, max_queued=config.max_pending), config, owned=True)


class ThreadedServer:
    """uvicorn serving ``app`` from a background thread (``port`` 0: any free port); ``url`` once bound."""

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="meswitch-http")

    def start(self, timeout: float = 60) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(store: str | os.PathLike, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          config: ServerConfig | None = None, engine_config: EngineConfig | None = None,
          base: str | os.PathLike | None = None, router: bool = True, log_level: str = "info",
          **uvicorn_kw: Any) -> None:
    """Load ``store`` (its base, and its router unless ``router`` is False) and serve it with uvicorn until
    interrupted."""
    import uvicorn

    config = config or ServerConfig()
    engine = Engine.from_store(store, base=base, config=engine_config)
    found = load_store_router(engine.store) if router else None
    routed = "routing 'auto'" if found is not None else "no router: 'auto' is unavailable"
    auth = "API key required" if config.api_key else "no API key"
    print(f"meswitch: serving {', '.join(engine.experts)} ({routed}; {auth}) on http://{host}:{port}/v1", flush=True)
    print(f"meswitch: {engine.backend_selection.describe()}", flush=True)
    uvicorn.run(engine_app(engine, found, config), host=host, port=port, log_level=log_level, **uvicorn_kw)
