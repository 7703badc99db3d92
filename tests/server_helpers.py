"""A live uvicorn for server tests: the app on 127.0.0.1, a free port, in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

KEY = "test-key-0123456789"


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 on a free port, in a thread (lifespan on)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class TinyServed:
    """A live server over a tiny lossless store (``tiny``: ``build_tiny``'s (base, store)) and its engine."""

    url: str
    tiny: tuple
    engine: object
    config: object


@contextmanager
def tiny_served(root, tokenizer, max_batch: int = 4, **config) -> Iterator[TinyServed]:
    """Build ``build_tiny`` under ``root`` and serve it (keyword router for ``auto``, the base as ``base``,
    ``config``: :class:`ServerConfig` fields over those defaults) on 127.0.0.1 until the block ends."""
    from meswitch.engine.background import BackgroundEngine
    from meswitch.front import Front
    from meswitch.server import ServerConfig, create_app
    from tests.engine_helpers import KeywordRouter, build_tiny, make_engine

    tiny = build_tiny(root)
    cfg = ServerConfig(**{"api_key": KEY, "max_tokens": 200, "max_pending": 16, "base_model_id": "base", **config})
    bg = BackgroundEngine(make_engine(tiny, tokenizer, max_batch=max_batch), max_pending=cfg.max_pending)
    front = Front(bg.experts, KeywordRouter(), max_queued=cfg.max_pending)
    with bg, LiveServer(create_app(bg, front, cfg)) as server:
        yield TinyServed(server.url, tiny, bg, cfg)
    front.close()
