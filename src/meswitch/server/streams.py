"""Server-sent event streams of a request's choices (``n`` per prompt), merged as their events come."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from meswitch.engine.client import RequestHandle
from meswitch.engine.request import Completion, StreamEvent
from meswitch.server import protocol as P
from meswitch.server.choices import completion_output, route_info, sse, usage
from meswitch.server.logprobs import chat_logprobs, next_offset

if TYPE_CHECKING:
    from meswitch.engine.client import EngineClient
    from meswitch.server.metrics import ServerMetrics


class StreamingMixin:
    """The chat and completion SSE streams of :class:`~meswitch.server.serving.OpenAIServing`."""

    engine: EngineClient
    metrics: ServerMetrics

    async def _events(self, handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Every choice's events as they come, tagged with the choice's index, until all have finished."""
        if len(handles) == 1:
            async for ev in self.engine.stream(handles[0]):
                yield 0, ev
            return
        q: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            async for ev in self.engine.stream(h):
                await q.put((i, ev))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            left = len(handles)
            while left:
                i, ev = await q.get()
                left -= ev.finished
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()

    def _ended(self, c: Completion, endpoint: str) -> str | None:
        """Record ``c``; the SSE error event when it failed or was cancelled."""
        self.metrics.finished(endpoint, c)
        if c.finish_reason in ("error", "cancelled"):
            return sse(P.error_body(f"generation {c.finish_reason}: {c.error or ''}".strip(": "), "server_error",
                                     None, f"generation_{c.finish_reason}"))
        return None

    async def _chat_chunks(self, handles: list[RequestHandle], body: P.ChatCompletionRequest) -> AsyncIterator[str]:
        rid, created = f"chatcmpl-{handles[0].request_id}", P._now()

        def chunk(i: int, delta: P.DeltaMessage, finish: str | None = None, lp: P.ChatLogprobs | None = None,
                  **kw: Any) -> str:
            return sse(P.ChatCompletionChunk(id=rid, created=created, model=body.model, **kw, choices=[
                P.ChatChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=lp)]))

        for i in range(len(handles)):
            yield chunk(i, P.DeltaMessage(role="assistant", content=""), meswitch=route_info(handles[0]) if i == 0 else None)
        done: list[Completion | None] = [None] * len(handles)
        async for i, ev in self._events(handles):
            lp = chat_logprobs(ev.logprobs) if body.logprobs and ev.logprobs else None
            c = ev.completion
            if c is not None and (error := self._ended(c, "chat")) is not None:
                yield error
                break
            if ev.text or lp is not None:
                yield chunk(i, P.DeltaMessage(content=ev.text), lp=lp)
            if c is not None:
                done[i] = c
                yield chunk(i, P.DeltaMessage(), c.finish_reason, meswitch=route_info(handles[i], c))
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield sse(P.ChatCompletionChunk(id=rid, created=created, model=body.model, choices=[],
                                                 usage=usage([c for c in done if c is not None], body.n)))
        yield "data: [DONE]\n\n"

    async def _completion_chunks(self, handles: list[RequestHandle], body: P.CompletionRequest,
                                 starts: list[int]) -> AsyncIterator[str]:
        rid, created = f"cmpl-{handles[0].request_id}", P._now()
        offsets = list(starts)
        first = True
        done: list[Completion | None] = [None] * len(handles)
        async for i, ev in self._events(handles):
            c = ev.completion
            if c is not None and (error := self._ended(c, "completions")) is not None:
                yield error
                break
            text, lp = completion_output(body, ev.text, ev.logprobs or [], ev.echo, offsets[i])
            if lp is not None:
                offsets[i] = next_offset(lp, offsets[i])
            if c is None and not text and not (lp and lp.tokens):
                continue
            route = route_info(handles[i], c) if c is not None else route_info(handles[i]) if first else None
            first = False
            yield sse(P.CompletionChunk(id=rid, created=created, model=body.model, meswitch=route, choices=[
                P.CompletionChoice(index=i, text=text, finish_reason=c.finish_reason if c else None, logprobs=lp)]))
            if c is not None:
                done[i] = c
        else:
            if body.stream_options and body.stream_options.include_usage:
                yield sse(P.CompletionChunk(id=rid, created=created, model=body.model, choices=[],
                                             usage=usage([c for c in done if c is not None], body.n)))
        yield "data: [DONE]\n\n"
