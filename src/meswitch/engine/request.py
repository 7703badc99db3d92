"""What goes into the engine (a :class:`Request`) and what comes out (events and a :class:`Completion`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from meswitch.engine.errors import InvalidRequestError
from meswitch.engine.sampling import SamplingParams

ROLES = ("system", "user", "assistant")


@dataclass
class Request:
    """One generation request.

    Exactly one of ``prompt`` (raw text, completed as is), ``prompt_token_ids`` (the prompt already
    tokenized, taken as is) and ``messages`` (chat turns rendered with the tokenizer's chat template,
    ``[{"role": ..., "content": ...}]``) is given. ``echo``: the completion also carries the
    prompt's text and tokens (with ``params.prompt_logprobs``, their log-probabilities). ``expert`` names a
    stored expert or is None (the base model alone). ``route``: the router's decision that chose
    ``expert``, set by :mod:`meswitch.front` for ``"auto"`` requests; the engine hands it back on the
    :class:`Completion`.
    """

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    expert: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    route: Route | None = None
    prompt_token_ids: list[int] | None = None
    echo: bool = False


class InvalidPromptError(InvalidRequestError):
    """The prompt itself is unusable (empty, or token ids outside the vocabulary); ``param``: the field to blame."""

    param = "prompt"


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position: its token id, its text (``decode([id])``), its raw bytes, its log-probability."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A token of the prompt or of the output with its log-probability (None: the prompt's first token)
    and the most likely alternatives at its position (``top``, most likely first)."""

    token_id: int
    token: str
    bytes: bytes
    logprob: float | None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Echo:
    """The prompt handed back (``Request.echo``): its text and, one per prompt token, :class:`TokenLogprob`
    (``logprob``/``top`` filled when ``params.prompt_logprobs`` asked for them)."""

    text: str
    tokens: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Route:
    """The router's decision for an ``"auto"`` request (made by :mod:`meswitch.front`)."""

    expert: str
    domain: str
    confidence: float
    fallback: bool
    warnings: tuple[str, ...] = ()  # what the router worked around (an expert it could not score, say)

    def as_dict(self) -> dict[str, Any]:
        out = {"expert": self.expert, "domain": self.domain, "confidence": self.confidence, "fallback": self.fallback}
        return {**out, "warnings": list(self.warnings)} if self.warnings else out


@dataclass(frozen=True)
class Completion:
    """The finished result of one request. ``finish_reason``: ``stop``, ``length``, ``cancelled`` or ``error``."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    expert: str | None
    usage: Usage
    route: Route | None = None
    error: str | None = None
    ttft_s: float | None = None  # time from arrival to the first generated token
    latency_s: float = 0.0  # time from arrival to the end
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when params.logprobs asked
    echo: Echo | None = None  # the prompt, when the request asked for it


@dataclass(frozen=True)
class StreamEvent:
    """New output of one request: text and token ids since the last event; ``completion`` on the last one.

    ``logprobs``: one per ``token_ids`` entry when the request asked; ``echo``: the prompt, on the
    request's first event when it asked for it.
    """

    request_id: str
    text: str
    token_ids: list[int]
    completion: Completion | None = None
    logprobs: list[TokenLogprob] | None = None
    echo: Echo | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None
