"""What lm-evaluation-harness asks of a model, on an :class:`Engine` through its public API, without lm-eval.

Every function takes all of its items at once and hands them to ``Engine.generate`` in chunks of
``chunk`` requests, so the engine batches them (continuous batching over ``max_batch`` slots, requests
for different experts side by side). Each item names its expert (None: the base) and, when the
router chose it, the :class:`Route`.

- :func:`score_continuations`: the log-likelihood of a continuation after a context and whether it is
  the greedy one, from the engine's prompt log-probabilities (``max_tokens=0``);
- :func:`rolling_windows`: lm-eval's disjoint windows over a long text (its ``loglikelihood_rolling``);
- :func:`generate_texts`: greedy (or sampled) text until a stop string.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from meswitch.engine import Completion, Engine, Request, Route, SamplingParams
from meswitch.errors import MeswitchError

CHUNK = 256  # requests handed to Engine.generate at once (its waiting queue holds max_waiting = 1024)


class ScoringError(MeswitchError):
    """The engine failed a request while scoring or generating for an evaluation."""


@dataclass(frozen=True)
class Target:
    """Who serves an item: ``expert`` (None: the base) and the router's decision when it chose."""

    expert: str | None
    route: Route | None = None


@dataclass(frozen=True)
class Continuation:
    """``tokens``: context then continuation, whose last ``n_scored`` tokens are scored."""

    tokens: list[int]
    n_scored: int
    target: Target


@dataclass(frozen=True)
class Generation:
    """A prompt (token ids) to complete with ``params``."""

    tokens: list[int]
    params: SamplingParams
    target: Target


def _chunks(items: Sequence[Request], size: int) -> Iterator[Sequence[Request]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _run(engine: Engine, requests: Sequence[Request], chunk: int) -> list[Completion]:
    """All ``requests`` through ``engine.generate``, ``chunk`` at a time; an engine error raises."""
    out: list[Completion] = []
    for part in _chunks(requests, max(1, chunk)):
        done = engine.generate(list(part))
        for c in done:
            if c.finish_reason == "error":
                raise ScoringError(f"the engine failed request {c.request_id} (expert {c.expert!r}): {c.error}")
        out.extend(done)
    return out


def score_continuations(engine: Engine, items: Sequence[Continuation], chunk: int = CHUNK) -> list[tuple[float, bool]]:
    """``(sum of log p(token | everything before it) over the scored tokens, every one of them the argmax)``.

    The whole sequence is one prompt scored by the engine (``prompt_logprobs=1``, ``max_tokens=0``):
    the log-probabilities are ``log_softmax`` of its logits, the greedy check compares each scored
    token with the most likely one at its position.
    """
    params = SamplingParams(max_tokens=0, prompt_logprobs=1)
    for it in items:
        if not 1 <= it.n_scored < len(it.tokens):
            raise ValueError(f"score 1 to {len(it.tokens) - 1} of {len(it.tokens)} tokens, not {it.n_scored}")
    reqs = [Request(prompt_token_ids=list(it.tokens), expert=it.target.expert, route=it.target.route,
                    params=params, echo=True) for it in items]
    out = []
    for it, comp in zip(items, _run(engine, reqs, chunk), strict=True):
        if comp.echo is None or len(comp.echo.tokens) != len(it.tokens):
            raise ScoringError(f"request {comp.request_id}: the engine returned no prompt log-probabilities")
        scored = comp.echo.tokens[-it.n_scored :]
        total = sum(float(t.logprob) for t in scored)  # type: ignore[arg-type]  # only the first token has None
        greedy = all(t.top and (t.top[0].token_id == t.token_id or t.logprob >= t.top[0].logprob) for t in scored)
        out.append((total, bool(greedy)))
    return out


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], int]]:
    """lm-eval's ``loglikelihood_rolling`` windows: ``[(window tokens, scored count)]`` covering ``tokens``.

    Every token is scored exactly once: the first window starts with ``prefix`` (the BOS/EOS token
    lm-eval conditions the first token on) and scores up to ``max_length`` tokens; each later one
    scores the next ``max_length`` tokens after the ``max_length - n`` before them (as
    ``lm_eval.utils.get_rolling_token_windows`` with ``context_len=1`` and ``make_disjoint_window``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = []
    done = 0
    while done < len(tokens):
        n = min(max_length, len(tokens) - done)
        end = done + n
        window = [prefix, *tokens[:end]] if done == 0 else tokens[max(0, end - max_length - 1) : end]
        out.append((window, n))
        done = end
    return out


def generate_texts(engine: Engine, items: Sequence[Generation], chunk: int = CHUNK) -> list[str]:
    """The generated text of each item (stop strings cut off and not included, as the engine does)."""
    reqs = [Request(prompt_token_ids=list(it.tokens), expert=it.target.expert, route=it.target.route,
                    params=it.params) for it in items]
    return [c.text for c in _run(engine, reqs, chunk)]
