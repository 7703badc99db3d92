"""``create_app`` (an ASGI app over an engine) and ``serve`` (load a store and run uvicorn)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from meswitch.engine.background import BackgroundEngine
from meswitch.engine.engine import Engine, EngineConfig
from meswitch.server.config import ServerConfig
from meswitch.server.metrics import ServerMetrics
from meswitch.server.routes import build_app
from meswitch.server.serving import OpenAIServing


def create_app(engine: Engine | BackgroundEngine, config: ServerConfig | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``engine``.

    An :class:`Engine` is wrapped in a :class:`BackgroundEngine` that the app starts and stops with
    its lifespan; a given :class:`BackgroundEngine` is started if needed and left running.
    """
    config = config or ServerConfig()
    owned = isinstance(engine, Engine)
    bg = BackgroundEngine(engine, max_pending=config.max_pending) if owned else engine

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        bg.start()
        try:
            yield
        finally:
            if owned:
                bg.shutdown()

    serving = OpenAIServing(bg, config, ServerMetrics())
    app = build_app(serving, config, lifespan)
    app.state.engine = bg
    return app


class ThreadedServer:
    """uvicorn serving ``app`` from a background thread (``port`` 0: any free port); ``url`` once bound."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
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


def serve(store: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          engine_config: EngineConfig | None = None, base: str | os.PathLike | None = None,
          log_level: str = "info", **uvicorn_kw: Any) -> None:
    """Load ``store`` (its base and router) and serve it with uvicorn until interrupted."""
    import uvicorn

    engine = Engine.from_store(store, base=base, config=engine_config)
    uvicorn.run(create_app(engine, config), host=host, port=port, log_level=log_level, **uvicorn_kw)
