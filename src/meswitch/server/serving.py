"""OpenAI requests -> engine :class:`Request` s -> OpenAI responses and server-sent event streams.

:class:`OpenAIServing` is the layer between the HTTP routes and an :class:`EngineClient`: it maps
request fields to :class:`SamplingParams`, resolves ``model`` with the :class:`Front` (a name, or
``"auto"`` through the router), maps errors to OpenAI errors (:class:`APIError`) and completions to
bodies. A client that disconnects has its request cancelled, which frees its batch slot at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from meswitch.engine.client import EngineClient, RequestHandle
from meswitch.engine.errors import (
    ContextLengthError,
    EngineOverloadedError,
    EngineStoppedError,
    InvalidRequestError,
    UnknownModelError,
)
from meswitch.engine.request import Completion, Request, StreamEvent
from meswitch.engine.sampling import SamplingParams
from meswitch.front.errors import RoutingUnavailableError
from meswitch.front.routing import Front
from meswitch.server import protocol as P
from meswitch.server.config import ServerConfig
from meswitch.server.metrics import ServerMetrics

EXPERT_HEADER = "x-meswitch-expert"
GREEDY_BELOW = 1e-5


class APIError(Exception):
    """An error with its HTTP status and OpenAI ``type``/``code``/``param``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(P.error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def engine_error(exc: Exception) -> APIError:
    """The OpenAI error for an exception raised while submitting a request."""
    msg = str(exc)
    if isinstance(exc, UnknownModelError):
        return APIError(404, msg, "not_found_error", "model", "model_not_found")
    if isinstance(exc, RoutingUnavailableError):
        return APIError(400, msg, "invalid_request_error", "model", "routing_unavailable")
    if isinstance(exc, ContextLengthError):
        return APIError(400, msg, "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, msg, "invalid_request_error", None, "invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, f"the server is overloaded: {msg}; retry later", "rate_limit_error", None,
                        "overloaded", {"retry-after": "1"})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, msg, "server_error", None, "unavailable")
    return APIError(500, f"{type(exc).__name__}: {msg}", "server_error", None, "internal_error")


def route_info(handle: RequestHandle, completion: Completion | None = None) -> P.RouteInfo:
    route = (completion.route if completion else None) or handle.route
    expert = completion.expert if completion else handle.expert
    if route is None:
        return P.RouteInfo(expert=expert)
    return P.RouteInfo(expert=expert, domain=route.domain, confidence=route.confidence, fallback=route.fallback)


def _usage(c: Completion) -> P.UsageInfo:
    return P.UsageInfo(prompt_tokens=c.usage.prompt_tokens, completion_tokens=c.usage.completion_tokens,
                       total_tokens=c.usage.total_tokens)


def _sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


class OpenAIServing:
    """Serve ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` over ``engine``.

    ``front`` resolves each request's ``model`` (its router, if any, serves ``"auto"``) before
    ``engine`` sees the request.
    """

    def __init__(self, engine: EngineClient, front: Front, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.front, self.config, self.metrics = engine, front, config, metrics

    @property
    def experts(self) -> list[str]:
        return self.front.experts

    @property
    def routed(self) -> bool:
        return self.front.routed

    def models(self) -> P.ModelList:
        """Every expert, and ``auto`` when the front has a router to choose one."""
        return P.ModelList(data=[P.ModelCard(id=n) for n in self.front.models()])

    def _params(self, body: P._Sampling, max_tokens: int | None, default: int) -> SamplingParams:
        n = max_tokens if max_tokens is not None else min(default, self.config.max_tokens)
        if n > self.config.max_tokens:
            raise APIError(400, f"max_tokens is {n}; this server allows at most {self.config.max_tokens}",
                           param="max_tokens", code="max_tokens_too_large")
        stop = body.stop if isinstance(body.stop, list) else [body.stop] if body.stop else []
        if any(not s for s in stop):
            raise APIError(400, "stop sequences must be non-empty strings", param="stop", code="invalid_value")
        try:
            # As vLLM: a temperature this small is greedy (dividing logits by 5e-324 overflows to inf/nan).
            temperature = 0.0 if body.temperature < GREEDY_BELOW else body.temperature
            # The engine's nucleus filter compares in float32, where a top_p under ~1e-45 is 0 and drops every
            # token; any top_p this small keeps just the most likely token anyway.
            top_p = max(body.top_p, GREEDY_BELOW)
            return SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p, stop=tuple(stop),
                                  seed=body.seed, ignore_eos=body.ignore_eos)
        except InvalidRequestError as e:
            raise APIError(400, str(e), code="invalid_value") from e

    async def _submit(self, request: Request, http: HTTPRequest) -> tuple[RequestHandle, asyncio.Task[None]]:
        """Resolve the expert with the front, submit and await admission.

        The returned task cancels the request if the client disconnects. It starts before admission:
        a client that leaves while its request is still in the inbox must not leave it to run.
        """
        try:
            request = await self.front.resolve_async(request)
            handle, admitted = self.engine.submit_nowait(request, asyncio.get_running_loop())
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            raise engine_error(exc) from exc
        watcher = asyncio.create_task(_cancel_on_disconnect(http, handle))
        try:
            await asyncio.wrap_future(admitted)
        except BaseException as exc:
            watcher.cancel()
            handle.cancel()
            if isinstance(exc, Exception):
                raise engine_error(exc) from exc
            raise
        return handle, watcher

    # ---- endpoints -----------------------------------------------------------------------------

    async def chat(self, body: P.ChatCompletionRequest, http: HTTPRequest) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "every message is empty", param="messages", code="invalid_value")
        params = self._params(body, body.max_completion_tokens or body.max_tokens, self.config.default_max_tokens)
        handle, watcher = await self._submit(Request(messages=messages, expert=body.model, params=params), http)
        if body.stream:
            return self._streaming(handle, watcher, self._chat_chunks(handle, body))
        c = await self._wait(handle, watcher, "chat")
        return self._json(handle, P.ChatCompletionResponse(
            model=body.model, usage=_usage(c), meswitch=route_info(handle, c),
            choices=[P.ChatChoice(message=P.ChatMessageOut(content=c.text), finish_reason=c.finish_reason)]))

    async def completion(self, body: P.CompletionRequest, http: HTTPRequest) -> Any:
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        if not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt", code="invalid_value")
        params = self._params(body, body.max_tokens, P.COMPLETION_MAX_TOKENS)
        handle, watcher = await self._submit(Request(prompt=prompt, expert=body.model, params=params), http)
        if body.stream:
            return self._streaming(handle, watcher, self._completion_chunks(handle, body))
        c = await self._wait(handle, watcher, "completions")
        return self._json(handle, P.CompletionResponse(
            model=body.model, usage=_usage(c), meswitch=route_info(handle, c),
            choices=[P.CompletionChoice(text=c.text, finish_reason=c.finish_reason)]))

    # ---- plumbing ------------------------------------------------------------------------------

    def _headers(self, handle: RequestHandle) -> dict[str, str]:
        """Response headers naming who answered (a subclass may add its own, e.g. the replica)."""
        return {EXPERT_HEADER: handle.expert or "base"}

    def _json(self, handle: RequestHandle, body: BaseModel) -> JSONResponse:
        return JSONResponse(body.model_dump(), headers=self._headers(handle))

    async def _wait(self, handle: RequestHandle, watcher: asyncio.Task[None], endpoint: str) -> Completion:
        """The completion (``watcher`` cancels the request if the client disconnects first)."""
        try:
            c = await _completion(self.engine.stream(handle))
        finally:
            watcher.cancel()
            handle.cancel()  # no-op once finished; covers this task being cancelled
        self.metrics.finished(endpoint, c)
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {c.error}", "server_error", None, "generation_failed")
        if c.finish_reason == "cancelled":
            raise APIError(499, "the request was cancelled", "invalid_request_error", None, "cancelled")
        return c

    def _streaming(self, handle: RequestHandle, watcher: asyncio.Task[None],
                   chunks: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:  # also when the response task is cancelled because the client left
                watcher.cancel()
                handle.cancel()

        headers = {**self._headers(handle), "cache-control": "no-cache"}
        return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)

    async def _chat_chunks(self, handle: RequestHandle, body: P.ChatCompletionRequest) -> AsyncIterator[str]:
        rid, created = f"chatcmpl-{handle.request_id}", P._now()

        def chunk(delta: P.DeltaMessage, finish: str | None = None, **kw: Any) -> str:
            return _sse(P.ChatCompletionChunk(id=rid, created=created, model=body.model, **kw,
                                              choices=[P.ChatChunkChoice(delta=delta, finish_reason=finish)]))

        yield chunk(P.DeltaMessage(role="assistant", content=""), meswitch=route_info(handle))
        async for ev in self.engine.stream(handle):
            c = ev.completion
            if c is None:
                if ev.text:
                    yield chunk(P.DeltaMessage(content=ev.text))
                continue
            self.metrics.finished("chat", c)
            if c.finish_reason in ("error", "cancelled"):
                yield _sse(P.error_body(f"generation {c.finish_reason}: {c.error or ''}".strip(": "), "server_error",
                                        None, f"generation_{c.finish_reason}"))
                break
            if ev.text:
                yield chunk(P.DeltaMessage(content=ev.text))
            yield chunk(P.DeltaMessage(), c.finish_reason, meswitch=route_info(handle, c))
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(P.ChatCompletionChunk(id=rid, created=created, model=body.model, choices=[],
                                                 usage=_usage(c)))
        yield "data: [DONE]\n\n"

    async def _completion_chunks(self, handle: RequestHandle, body: P.CompletionRequest) -> AsyncIterator[str]:
        rid, created = f"cmpl-{handle.request_id}", P._now()

        def chunk(text: str, finish: str | None = None, **kw: Any) -> str:
            return _sse(P.CompletionChunk(id=rid, created=created, model=body.model, **kw,
                                          choices=[P.CompletionChoice(text=text, finish_reason=finish)]))

        first = True
        async for ev in self.engine.stream(handle):
            c = ev.completion
            if c is None:
                if ev.text:
                    yield chunk(ev.text, meswitch=route_info(handle) if first else None)
                    first = False
                continue
            self.metrics.finished("completions", c)
            if c.finish_reason in ("error", "cancelled"):
                yield _sse(P.error_body(f"generation {c.finish_reason}: {c.error or ''}".strip(": "), "server_error",
                                        None, f"generation_{c.finish_reason}"))
                break
            yield chunk(ev.text, c.finish_reason, meswitch=route_info(handle, c))
            if body.stream_options and body.stream_options.include_usage:
                yield _sse(P.CompletionChunk(id=rid, created=created, model=body.model, choices=[], usage=_usage(c)))
        yield "data: [DONE]\n\n"


async def _completion(events: AsyncIterator[StreamEvent]) -> Completion:
    """The completion that ends a request's events, the others discarded."""
    async for ev in events:
        if ev.completion is not None:
            return ev.completion
    raise EngineStoppedError("the request's events ended without a completion")


async def _cancel_on_disconnect(http: HTTPRequest, handle: RequestHandle) -> None:
    """Wait for the client to go away, then cancel its request (the body has been read already)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return
