"""What goes into the engine (a :class:`Request`) and what comes out (events and a :class:`Completion`)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from meswitch.engine.sampling import SamplingParams

ROLES = ("system", "user", "assistant")


@dataclass
class Request:
    """One generation request.

    Exactly one of ``prompt`` (raw text, completed as is) and ``messages`` (chat turns rendered with
    the tokenizer's chat template, ``[{"role": ..., "content": ...}]``) is given. ``expert`` names a
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

    def as_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "domain": self.domain, "confidence": self.confidence, "fallback": self.fallback}


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


@dataclass(frozen=True)
class StreamEvent:
    """New output of one request: text and token ids since the last event; ``completion`` on the last one."""

    request_id: str
    text: str
    token_ids: list[int]
    completion: Completion | None = None

    @property
    def finished(self) -> bool:
        return self.completion is not None
