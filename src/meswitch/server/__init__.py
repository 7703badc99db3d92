"""OpenAI-compatible HTTP server over the multi-expert engine.

``protocol`` (request/response models, error shape), ``serving`` (protocol <-> engine),
``routes`` (the FastAPI app: routes, error handlers), ``middleware`` (API key, body limits),
``metrics`` (Prometheus text), ``app`` (:func:`create_app`, :func:`serve`). Needs the ``serve`` extra.
"""

from meswitch.server.app import ThreadedServer, create_app, serve
from meswitch.server.config import ServerConfig

__all__ = ["ServerConfig", "ThreadedServer", "create_app", "serve"]
