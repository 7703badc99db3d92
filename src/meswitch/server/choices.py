"""A request's choices: its prompts (each ``n`` times), their seeds, usage, route info and output shapes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from meswitch.engine.client import RequestHandle
from meswitch.engine.request import Completion, Echo, TokenLogprob
from meswitch.server import protocol as P
from meswitch.server.errors import APIError
from meswitch.server.logprobs import completion_logprobs


def route_info(handle: RequestHandle, completion: Completion | None = None) -> P.RouteInfo:
    route = (completion.route if completion else None) or handle.route
    expert = completion.expert if completion else handle.expert
    if route is None:
        return P.RouteInfo(expert=expert)
    return P.RouteInfo(expert=expert, domain=route.domain, confidence=route.confidence, fallback=route.fallback,
                       warnings=list(route.warnings) or None)


def usage(cs: Sequence[Completion], n: int) -> P.UsageInfo:
    """Usage of a request's choices, ``n`` per prompt: each prompt counted once, every choice's output."""
    prompt = sum(c.usage.prompt_tokens for c in cs[::n])
    out = sum(c.usage.completion_tokens for c in cs)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=out, total_tokens=prompt + out)


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of a prompt's ``j``-th choice: ``seed`` itself for the first (as with ``n=1``), then a
    different, reproducible one per choice (None stays None: every choice draws its own)."""
    if seed is None or j == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + j * 0xBF58476D1CE4E5B9) % (1 << 63)


def sse(obj: BaseModel | dict[str, Any]) -> str:
    data = obj.model_dump_json(exclude_none=False) if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def prompts(prompt: P.Prompt) -> list[str | list[int]]:
    """The request's prompts, one choice (times n) each: a string, strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif not prompt:
        raise APIError(400, "prompt must not be an empty list", param="prompt", code="invalid_value")
    elif all(isinstance(t, int) for t in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    for i, p in enumerate(prompts):
        if not p:
            where = "prompt" if len(prompts) == 1 else f"prompt.{i}"
            raise APIError(400, f"{where} must not be empty", param=where, code="invalid_value")
    return prompts


def completion_output(body: P.CompletionRequest, text: str, tokens: Sequence[TokenLogprob],
                      echo: Echo | None, offset: int) -> tuple[str, P.CompletionLogprobs | None]:
    """A choice's text and legacy logprobs: the prompt first when it is echoed here (``echo``, the engine's
    :class:`~meswitch.engine.request.Echo`), then the output; ``offset``: the first token's text offset."""
    if body.echo and echo is not None:
        text = echo.text + text
        tokens = [*echo.tokens, *tokens]
    return text, completion_logprobs(tokens, offset) if body.logprobs is not None else None
