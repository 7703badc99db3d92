"""Sampling parameters and the pure function that picks next tokens from logits.

Shapes: ``S`` sequences in a decode step, ``V`` vocabulary size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from meswitch.engine.errors import InvalidRequestError

GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # alternatives per token the engine reports at most (vLLM's default ``max_logprobs``)


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings, with the OpenAI/vLLM meaning.

    ``temperature == 0`` (or below ``GREEDY_BELOW``) is greedy decoding; ``top_p`` keeps the smallest set of tokens whose
    probability reaches it; ``stop`` strings end generation and are not returned; ``seed`` makes
    sampling reproducible for this request alone, whatever else shares its batch.

    ``logprobs``: report each generated token's log-probability and the ``logprobs`` most likely
    alternatives (None: none, 0: the chosen token's only); ``prompt_logprobs``: the same for every
    prompt token (the first has none). Both are the model's own distribution, ``log_softmax(logits)``,
    before temperature and ``top_p`` (as vLLM's default). ``max_tokens`` may be 0 only with
    ``prompt_logprobs``: the prompt is scored and nothing is generated.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_LOGPROBS):
                raise InvalidRequestError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {v!r}")
        least = 0 if self.prompt_logprobs is not None else 1
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < least:
            raise InvalidRequestError(f"max_tokens must be an int >= {least}, got {self.max_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequestError(f"stop must be non-empty strings, got {list(stop)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequestError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below ``GREEDY_BELOW`` decode greedily (as vLLM): dividing by them overflows."""
        return self.temperature < GREEDY_BELOW


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``logits: [V]`` -> ``[V]`` with every token outside the top-``p`` nucleus set to ``-inf``.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least ``p``
    (the most likely token is always kept).
    """
    if top_p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # mass before this token already reaches p
    drop[0] = False  # the most likely token always stays (a p that rounds to 0 must not empty the set)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def top_p_filter_rows(logits: Tensor, top_p: Tensor) -> Tensor:
    """:func:`top_p_filter` on every row at once: ``logits: [k, V]``, ``top_p: float32 [k]`` (each ``< 1``) ->
    ``[k, V]``, row ``i`` equal to ``top_p_filter(logits[i], top_p[i])``."""
    sorted_logits, order = torch.sort(logits, -1, descending=True)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, -1) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> Tensor:
    """Next token per sequence: ``logits: [S, V]`` (float) -> ``int64 [S]``.

    Row ``i`` is ``argmax`` when ``params[i].greedy``, else a draw from
    ``softmax(top_p_filter(logits[i] / temperature))`` with ``generators[i]``. The argmax, the
    temperatures, the top-p filter and the softmax run on every row at once; each draw uses its own
    request's generator, so a seeded request gets the same tokens whatever shares its batch.
    """
    if logits.dim() != 2 or not logits.shape[0] == len(params) == len(generators):
        raise ValueError(f"logits must be [S={len(params)}, V], got shape {tuple(logits.shape)}")
    out = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if not p.greedy]
    if not hot:
        return out
    rows = logits.index_select(0, torch.tensor(hot, device=logits.device)).float()
    rows = rows / torch.tensor([params[i].temperature for i in hot], device=rows.device)[:, None]
    nucleus = [j for j, i in enumerate(hot) if params[i].top_p < 1]
    if nucleus:
        at = torch.tensor(nucleus, device=rows.device)
        top_p = torch.tensor([params[hot[j]].top_p for j in nucleus], dtype=torch.float32, device=rows.device)
        rows.index_copy_(0, at, top_p_filter_rows(rows.index_select(0, at), top_p))
    probs = torch.softmax(rows, -1).cpu()
    drawn = [torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(hot)]
    out.index_copy_(0, torch.tensor(hot, device=out.device), torch.cat(drawn).to(out.device))
    return out


def token_logprobs(logits: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The model's log-probabilities of ``chosen`` tokens and the ``k`` most likely ones.

    ``logits: [R, V]``, ``chosen: int64 [R]`` -> ``(chosen_lp: float32 [R], top_ids: int64 [R, k],
    top_lp: float32 [R, k])``, all from ``log_softmax(logits)`` in float32 (no temperature, no top_p):
    a chosen token that is also a top one has bit-identical values in both.
    """
    lp = torch.log_softmax(logits.float(), -1)
    chosen_lp = lp.gather(1, chosen.view(-1, 1).to(lp.device))[:, 0]
    top_lp, top_ids = lp.topk(k, -1) if k > 0 else (lp[:, :0], chosen.new_zeros(len(chosen), 0))
    return chosen_lp, top_ids, top_lp
