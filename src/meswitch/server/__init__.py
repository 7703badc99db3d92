"""OpenAI-compatible HTTP server over the multi-expert engine.

``protocol`` (request/response models, error shape), ``serving`` (protocol <-> engine client, model
names resolved by ``meswitch.front``), ``routes`` (the FastAPI app: routes, error handlers),
``middleware`` (API key, body limits), ``metrics`` (Prometheus text), ``config`` (:class:`ServerConfig`),
``app`` (:func:`create_app`, :func:`engine_app`, :func:`serve`). Needs the ``serve`` extra.

The app and its engine imports load on first use, so reading ``meswitch.server.config`` (the CLI's
defaults) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meswitch.server.config import ServerConfig

if TYPE_CHECKING:
    from meswitch.server.app import ThreadedServer, create_app, engine_app, serve

__all__ = ["ServerConfig", "ThreadedServer", "create_app", "engine_app", "serve"]
_FROM_APP = {"ThreadedServer", "create_app", "engine_app", "serve"}


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        return getattr(importlib.import_module("meswitch.server.app"), name)
    raise AttributeError(f"module 'meswitch.server' has no attribute {name!r}")
