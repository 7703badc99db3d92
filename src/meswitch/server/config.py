"""Settings of the HTTP server (limits and authentication), passed down explicitly."""

from __future__ import annotations

import os
from dataclasses import dataclass

API_KEY_ENV = "MESWITCH_API_KEY"
DEFAULT_HOST = "127.0.0.1"  # where `serve` listens unless told
DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServerConfig:
    """``api_key`` None: no authentication. Limits answer with 4xx errors in the OpenAI shape.

    ``max_tokens``: the most tokens one request may ask for (400 above); ``default_max_tokens``: for
    chat requests that do not say; ``max_pending``: requests in flight (waiting + running) before
    429; ``max_body_bytes``: request bodies above it get 413 (before they are read when they
    declare a Content-Length); ``body_timeout_s``: the whole body must arrive within it (else 408).
    ``max_n``: choices per prompt (``n``) at most; a request's prompts times ``n`` must also stay within
    ``max_pending``. ``base_model_id``: the model id that serves the base model alone (None: the base
    is not served; when set, ``/v1/models`` lists it after the experts).
    """

    api_key: str | None = None
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_pending: int = 64
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    max_n: int = 8
    base_model_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "default_max_tokens", "max_pending", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.body_timeout_s <= 0:
            raise ValueError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if self.base_model_id == "":
            raise ValueError("base_model_id must not be empty (None: the base is not served)")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (None disables authentication)")


def api_key_from_env(given: str | None) -> str | None:
    """``given`` if set, else ``$MESWITCH_API_KEY`` (unset or empty: None)."""
    return given or os.environ.get(API_KEY_ENV) or None
