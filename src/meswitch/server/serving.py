"""OpenAI requests -> engine :class:`Request` s -> OpenAI responses and server-sent event streams.

:class:`OpenAIServing` is the layer between the HTTP routes and an :class:`EngineClient`: it maps
request fields to :class:`SamplingParams`, resolves ``model`` with the :class:`Front` (a name, or
``"auto"`` through the router), maps errors to OpenAI errors (:class:`APIError`) and completions to
bodies. A client that disconnects has its request cancelled, which frees its batch slot at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
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
from meswitch.front.routing import AUTO, Front
from meswitch.server import protocol as P
from meswitch.server.choices import choice_seed, completion_output, route_info, usage
from meswitch.server.choices import prompts as prompts_of
from meswitch.server.config import ServerConfig
from meswitch.server.errors import APIError
from meswitch.server.logprobs import chat_logprobs
from meswitch.server.metrics import ServerMetrics
from meswitch.server.streams import StreamingMixin

EXPERT_HEADER = "x-meswitch-expert"
GREEDY_BELOW = 1e-5


def engine_error(exc: Exception, prompt_param: str = "messages") -> APIError:
    """The OpenAI error for an exception raised while submitting a request (``prompt_param``: the field that
    holds the prompt, ``messages`` or ``prompt``)."""
    msg = str(exc)
    if isinstance(exc, UnknownModelError):
        return APIError(404, msg, "not_found_error", "model", "model_not_found")
    if isinstance(exc, RoutingUnavailableError):
        return APIError(400, msg, "invalid_request_error", "model", "routing_unavailable")
    if isinstance(exc, ContextLengthError):
        return APIError(400, msg, "invalid_request_error", prompt_param, "context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        param = prompt_param if getattr(exc, "param", None) == "prompt" else None
        return APIError(400, msg, "invalid_request_error", param, "invalid_value")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, f"the server is overloaded: {msg}; retry later", "rate_limit_error", None,
                        "overloaded", {"retry-after": "1"})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, msg, "server_error", None, "unavailable")
    return APIError(500, f"{type(exc).__name__}: {msg}", "server_error", None, "internal_error")


class OpenAIServing(StreamingMixin):
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

    @property
    def base_id(self) -> str | None:
        """The model id that serves the base alone (None: not served; an expert of that name wins)."""
        b = self.config.base_model_id
        return b if b is not None and b not in self.front.experts else None

    def models(self) -> P.ModelList:
        """Every expert, ``auto`` when the front has a router to choose one, then the base when served."""
        names = self.front.models() + ([self.base_id] if self.base_id else [])
        return P.ModelList(data=[P.ModelCard(id=n) for n in names])

    def _params(self, body: P._Sampling, max_tokens: int | None, default: int, logprobs: int | None = None,
                prompt_logprobs: int | None = None) -> SamplingParams:
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
                                  seed=body.seed, ignore_eos=body.ignore_eos, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
        except InvalidRequestError as e:
            raise APIError(400, str(e), code="invalid_value") from e

    def _expert(self, body: P._Sampling) -> str | None:
        """The expert a request names for the front: ``model``, or None for the base's id."""
        return None if body.model == self.base_id else body.model

    def _check_n(self, body: P._Sampling, prompts: int) -> None:
        if body.n > self.config.max_n:
            raise APIError(400, f"n is {body.n}; this server allows at most {self.config.max_n}", param="n",
                           code="invalid_value")
        if prompts * body.n > self.config.max_pending:
            raise APIError(400, f"{prompts} prompts times n={body.n} is {prompts * body.n} choices; this server "
                           f"allows at most {self.config.max_pending} per request",
                           param="prompt" if prompts > 1 else "n", code="invalid_value")

    async def _submit(self, requests: Sequence[Request], n: int, http: HTTPRequest,
                      prompt_param: str) -> tuple[list[RequestHandle], asyncio.Task[None]]:
        """Resolve each request's expert with the front, submit it ``n`` times (choice seeds differ) and await
        admission; handles in choice order (prompt-major).

        The returned task cancels every request if the client disconnects. It starts before admission:
        a client that leaves while its requests are still in the inbox must not leave them to run. One
        refused request refuses them all.
        """
        handles: list[RequestHandle] = []
        watcher = asyncio.create_task(_cancel_on_disconnect(http, handles))
        try:
            for request in requests:
                try:
                    resolved = await self.front.resolve_async(request)
                except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
                    raise engine_error(exc, prompt_param) from exc
                for j in range(n):
                    one = resolved if j == 0 else dataclasses.replace(
                        resolved, request_id=uuid.uuid4().hex,
                        params=dataclasses.replace(resolved.params, seed=choice_seed(resolved.params.seed, j)))
                    await self._admit(one, handles, prompt_param)
        except BaseException:
            watcher.cancel()
            for h in handles:
                h.cancel()
            raise
        return handles, watcher

    async def _admit(self, request: Request, handles: list[RequestHandle], prompt_param: str) -> None:
        try:
            handle, admitted = self.engine.submit_nowait(request, asyncio.get_running_loop())
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            raise engine_error(exc, prompt_param) from exc
        handles.append(handle)
        try:
            await asyncio.wrap_future(admitted)
        except Exception as exc:  # noqa: BLE001
            raise engine_error(exc, prompt_param) from exc

    # ---- endpoints -----------------------------------------------------------------------------

    async def chat(self, body: P.ChatCompletionRequest, http: HTTPRequest) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "every message is empty", param="messages", code="invalid_value")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        self._check_n(body, 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self._params(body, body.max_completion_tokens or body.max_tokens, self.config.default_max_tokens,
                              logprobs)
        request = Request(messages=messages, expert=self._expert(body), params=params)
        handles, watcher = await self._submit([request], body.n, http, "messages")
        if body.stream:
            return self._streaming(handles, watcher, self._chat_chunks(handles, body))
        cs = await self._wait(handles, watcher, "chat")
        choices = [P.ChatChoice(index=i, message=P.ChatMessageOut(content=c.text), finish_reason=c.finish_reason,
                                logprobs=chat_logprobs(c.logprobs or []) if body.logprobs else None)
                   for i, c in enumerate(cs)]
        return self._json(handles[0], P.ChatCompletionResponse(
            model=body.model, usage=usage(cs, body.n), meswitch=route_info(handles[0], cs[0]), choices=choices))

    async def completion(self, body: P.CompletionRequest, http: HTTPRequest) -> Any:
        prompts = prompts_of(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (score the prompt without generating)",
                           param="max_tokens", code="invalid_value")
        if body.model == AUTO and any(not isinstance(p, str) for p in prompts):
            raise APIError(400, "model 'auto' routes on the prompt's text: give the prompt as text, or name an "
                           "expert", param="prompt", code="invalid_value")
        self._check_n(body, len(prompts))
        prompt_logprobs = None
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            prompt_logprobs = body.logprobs or 0
        params = self._params(body, body.max_tokens, P.COMPLETION_MAX_TOKENS, body.logprobs, prompt_logprobs)
        expert = self._expert(body)
        requests = [Request(prompt=p, expert=expert, params=params, echo=body.echo) if isinstance(p, str) else
                    Request(prompt_token_ids=p, expert=expert, params=params, echo=body.echo) for p in prompts]
        handles, watcher = await self._submit(requests, body.n, http, "prompt")
        starts = [0 if body.echo or not isinstance(p, str) else len(p) for p in prompts for _ in range(body.n)]
        if body.stream:
            return self._streaming(handles, watcher, self._completion_chunks(handles, body, starts))
        cs = await self._wait(handles, watcher, "completions")
        choices = []
        for i, c in enumerate(cs):
            text, lp = completion_output(body, c.text, c.logprobs or [], c.echo, starts[i])
            choices.append(P.CompletionChoice(index=i, text=text, finish_reason=c.finish_reason, logprobs=lp))
        return self._json(handles[0], P.CompletionResponse(
            model=body.model, usage=usage(cs, body.n), meswitch=route_info(handles[0], cs[0]), choices=choices))

    # ---- plumbing ------------------------------------------------------------------------------

    def _headers(self, handle: RequestHandle) -> dict[str, str]:
        """Response headers naming who answered (a subclass may add its own, e.g. the replica)."""
        return {EXPERT_HEADER: handle.expert or "base"}

    def _json(self, handle: RequestHandle, body: BaseModel) -> JSONResponse:
        return JSONResponse(body.model_dump(), headers=self._headers(handle))

    async def _wait(self, handles: list[RequestHandle], watcher: asyncio.Task[None], endpoint: str) -> list[Completion]:
        """Every choice's completion (``watcher`` cancels the requests if the client disconnects first)."""
        try:
            cs = await asyncio.gather(*(_completion(self.engine.stream(h)) for h in handles))
        finally:
            watcher.cancel()
            for h in handles:
                h.cancel()  # no-op once finished; covers this task being cancelled
        for c in cs:
            self.metrics.finished(endpoint, c)
        for c in cs:
            if c.finish_reason == "error":
                raise APIError(500, f"generation failed: {c.error}", "server_error", None, "generation_failed")
            if c.finish_reason == "cancelled":
                raise APIError(499, "the request was cancelled", "invalid_request_error", None, "cancelled")
        return cs

    def _streaming(self, handles: list[RequestHandle], watcher: asyncio.Task[None],
                   chunks: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:  # also when the response task is cancelled because the client left
                watcher.cancel()
                for h in handles:
                    h.cancel()

        headers = {**self._headers(handles[0]), "cache-control": "no-cache"}
        return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)

async def _completion(events: AsyncIterator[StreamEvent]) -> Completion:
    """The completion that ends a request's events, the others discarded."""
    async for ev in events:
        if ev.completion is not None:
            return ev.completion
    raise EngineStoppedError("the request's events ended without a completion")


async def _cancel_on_disconnect(http: HTTPRequest, handles: list[RequestHandle]) -> None:
    """Wait for the client to go away, then cancel its requests (the body has been read already; ``handles``
    may still grow while the requests are submitted)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return
