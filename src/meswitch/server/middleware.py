"""ASGI guards that run before any body is parsed: API key, body size and body read deadline.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) so that the body is read once,
under a size limit and a deadline, and then replayed to the app; later ``receive`` calls go to
the server, so the app still sees the client disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meswitch.server.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
_BODY_METHODS = {"POST", "PUT", "PATCH"}


async def send_error(send: Send, status: int, message: str, type_: str, code: str | None = None,
                     close: bool = False, extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += extra_headers or []
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def key_matches(header: bytes | None, key: bytes) -> bool:
    """Constant-time check of an ``Authorization: Bearer KEY`` header against ``key``."""
    scheme, _, given = (header or b"").partition(b" ")
    ok_scheme = scheme.lower() == b"bearer"
    return hmac.compare_digest(given.strip(), key) and ok_scheme


class GuardMiddleware:
    """401 without the API key (paths under ``protected``), 413 for large bodies, 408 for slow ones."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, body_timeout_s: float,
                 protected: str = "/v1", on_response: Callable[[str, int], None] | None = None):
        self.app = app
        self.on_response = on_response
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.timeout = body_timeout_s
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.on_response is not None:
            send = _counting(send, scope["path"], self.on_response)
        headers = dict(scope.get("headers") or [])
        protected = self.key is not None and scope["path"].startswith(self.protected)
        if protected and not key_matches(headers.get(b"authorization"), self.key):
            await send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             "authentication_error", "invalid_api_key",
                             extra_headers=[(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                await send_error(send, 400, "invalid Content-Length header", "invalid_request_error",
                                 "invalid_content_length", close=True)
                return
            if size > self.max_body:
                await send_error(send, 413, f"request body of {size} bytes exceeds the limit of {self.max_body}",
                                 "invalid_request_error", "request_too_large", close=True)
                return
        try:
            body = await self._read(receive)
        except (TimeoutError, asyncio.TimeoutError):  # distinct classes before Python 3.11
            await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s",
                             "invalid_request_error", "request_timeout", close=True)
            return
        except _TooLarge:
            await send_error(send, 413, f"request body exceeds the limit of {self.max_body} bytes",
                             "invalid_request_error", "request_too_large", close=True)
            return
        if body is None:  # the client left while sending
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError
            msg = await asyncio.wait_for(receive(), left)
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not msg.get("more_body", False):
                return b"".join(chunks)


def _counting(send: Send, path: str, record: Callable[[str, int], None]) -> Send:
    async def counted(message: Message) -> None:
        if message["type"] == "http.response.start":
            record(path, message["status"])
        await send(message)

    return counted


class _TooLarge(Exception):
    pass


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
