"""The engine's per-token log-probabilities in OpenAI's two wire shapes.

``/v1/completions`` (legacy): parallel lists ``tokens``, ``token_logprobs``, ``top_logprobs`` (a
``{token: logprob}`` dict per position holding the ``logprobs`` most likely tokens and the chosen
one, as OpenAI and vLLM) and ``text_offset`` (each token's character offset in the choice's text);
an echoed prompt's first token has ``None`` for both log-probability fields.
``/v1/chat/completions``: ``content``, one ``{token, logprob, bytes, top_logprobs}`` per output
token, ``top_logprobs`` the ``top_logprobs`` most likely alternatives.

Values are the model's: ``log_softmax`` of the expert's logits before temperature and ``top_p``
(vLLM's default), float32. ``-inf`` (a token the model rules out) becomes ``-9999.0``, as vLLM,
because JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from meswitch.engine.request import TokenLogprob, TopLogprob
from meswitch.server import protocol as P

FLOOR = -9999.0


def _finite(v: float) -> float:
    return v if math.isfinite(v) else FLOOR


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> P.CompletionLogprobs:
    """The legacy shape over ``tokens`` (``T`` of them: the lists all have length ``T``); ``offset``:
    the character offset of the first token in the choice's text."""
    out = P.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t in tokens:
        out.tokens.append(t.token)
        out.text_offset.append(offset)
        offset += len(t.token)
        if t.logprob is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        lp = _finite(t.logprob)
        out.token_logprobs.append(lp)
        top = {a.token: _finite(a.logprob) for a in t.top}
        top.setdefault(t.token, lp)  # the chosen token is always there (up to logprobs + 1 entries)
        out.top_logprobs.append(top)
    return out


def next_offset(logprobs: P.CompletionLogprobs, start: int) -> int:
    """The text offset just past the last token of ``logprobs`` (``start`` when it has none)."""
    if not logprobs.tokens:
        return start
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1])


def _top(a: TopLogprob) -> P.TopLogprobOut:
    return P.TopLogprobOut(token=a.token, logprob=_finite(a.logprob), bytes=list(a.bytes))


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> P.ChatLogprobs:
    """The chat shape over the output ``tokens`` (each with its ``top_logprobs`` alternatives)."""
    return P.ChatLogprobs(content=[
        P.TokenLogprobOut(token=t.token, logprob=_finite(t.logprob if t.logprob is not None else FLOOR),
                          bytes=list(t.bytes), top_logprobs=[_top(a) for a in t.top])
        for t in tokens])
