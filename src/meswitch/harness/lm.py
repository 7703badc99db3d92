"""``MeswitchLM``: lm-evaluation-harness's ``meswitch`` model, an :class:`Engine` over a delta store.

Importing this module imports lm_eval (the ``eval`` extra) and registers the class as ``meswitch``
in lm-eval's model registry. ``expert`` is a stored expert, ``base`` (or empty: the base model) or
``auto``: each request is then routed through :class:`meswitch.front.Front` on its context (all
choices of a multiple-choice question share their context, so one expert scores them all).
"""

from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from meswitch.engine import Engine, EngineConfig, Request, SamplingParams
from meswitch.engine.errors import InvalidRequestError, UnknownModelError
from meswitch.front import AUTO, Front, Router, RoutingUnavailableError, load_store_router
from meswitch.harness.scoring import (
    CHUNK,
    Continuation,
    Generation,
    Target,
    generate_texts,
    rolling_windows,
    score_continuations,
)

log = logging.getLogger(__name__)
BASE_NAMES = ("", "base", "none", "None")  # what ``expert=`` may say for the base model


def resolve_expert(expert: Any, experts: list[str], routed: bool) -> str | None:
    """``expert`` as a request names it: None for the base, ``"auto"``, or a checked expert name."""
    if expert is None or str(expert) in BASE_NAMES:
        return None
    name = str(expert)
    if name == AUTO:
        if not routed:
            raise RoutingUnavailableError("expert 'auto' needs a router: train one with `meswitch router train`")
        return AUTO
    if name not in experts:
        raise UnknownModelError(name, experts, also=("'auto' (routed)", "'base'"))
    return name


@register_model("meswitch")
class MeswitchLM(TemplateLM):
    """lm-eval's ``--model meswitch --model_args store=PATH,expert=NAME|auto|base``.

    Other model_args: ``base`` (the base checkpoint; default: the one the store records),
    ``backend`` (the engine's delta backend), ``max_batch`` (the engine's batch, default 16),
    ``max_length`` (tokens of context, default the engine's context - 1), ``chunk`` (requests handed
    to the engine at once), ``add_bos_token``. lm-eval's ``batch_size``/``device`` are ignored:
    every request goes to the engine at once and it batches them. From Python, ``engine=`` (an
    :class:`Engine`) and ``router=`` (any ``Router``) replace ``store``.
    """

    def __init__(
        self, store: str | None = None, expert: Any = None, base: str | None = None, backend: str = "auto",
        max_batch: int = 16, max_length: int | None = None, chunk: int = CHUNK, add_bos_token: bool = False,
        engine: Engine | None = None, router: Router | None = None, **ignored: Any,
    ) -> None:
        super().__init__()
        if ignored:
            log.debug("meswitch: ignoring lm-eval arguments %s", sorted(ignored))
        if engine is None:
            if store is None:
                raise InvalidRequestError("the meswitch model needs store=PATH (model_args store=...,expert=...)")
            engine = Engine.from_store(str(store), base=base, config=EngineConfig(max_batch=int(max_batch),
                                                                                 backend=backend))
            if router is None and str(expert) == AUTO:
                router = load_store_router(engine.store)
        self.engine = engine
        self.front = Front(engine.experts, router)
        self.expert = resolve_expert(expert, engine.experts, self.front.routed)
        self.tokenizer = engine.tokenizer
        self._max_length = int(max_length) if max_length else engine.max_context - 1
        if not 1 <= self._max_length < engine.max_context:
            raise InvalidRequestError(f"max_length must be in [1, {engine.max_context - 1}], got {self._max_length}")
        self.chunk = int(chunk)
        self.add_bos_token = bool(add_bos_token)
        self._routes: dict[str, Target] = {}

    # ---- what lm-eval reads ----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else 0)

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "meswitch")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(string, add_special_tokens=special)["input_ids"])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- routing ---------------------------------------------------------------------------------

    def target(self, text: str) -> Target:
        """Who serves a request whose context is ``text``: the named expert or base, or the router's choice."""
        if self.expert != AUTO:
            return Target(self.expert)
        hit = self._routes.get(text)
        if hit is None:
            name, route = self.front.decide(Request(prompt=text, expert=AUTO))
            hit = self._routes[text] = Target(name, route)
        return hit

    # ---- the three request types -----------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context ids, continuation ids)``, as TemplateLM builds them."""
        items = []
        for (context, _), ctx, cont in tqdm(requests, desc="meswitch: routing", disable=disable_tqdm or len(requests) < 2):
            whole = (ctx + cont)[-(self.max_length + 1) :]
            items.append(Continuation(whole, min(len(cont), len(whole) - 1), self.target(context)))
        out = score_continuations(self.engine, items, self.chunk)
        for (pair, _, _), res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The total log-likelihood of each text, over lm-eval's disjoint rolling windows, all batched at once."""
        items: list[Continuation] = []
        owner: list[int] = []
        for i, (text,) in enumerate(r.args for r in requests):
            target = self.target(text)
            for window, n in rolling_windows(self.tok_encode(text), self.prefix_token_id, self.max_length):
                items.append(Continuation(window, n, target))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, score_continuations(self.engine, items, self.chunk), strict=True):
            totals[i] += lp
        for r, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (``do_sample`` false, the default) completions up to lm-eval's ``until`` strings and ``max_gen_toks``."""
        items = []
        for context, gen_kwargs in (r.args for r in requests):
            params = self._params(dict(gen_kwargs or {}))
            ids = self.tok_encode(context)[-(self.engine.max_context - params.max_tokens) :]
            items.append(Generation(ids or [self.prefix_token_id], params, self.target(context)))
        out = generate_texts(self.engine, items, self.chunk)
        for r, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return out

    def _params(self, kw: dict[str, Any]) -> SamplingParams:
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = int(kw.pop("max_gen_toks", 256))
        max_tokens = max(1, min(max_tokens, self.engine.max_context - 1))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if sample else 0.0) or 0.0)
        return SamplingParams(max_tokens=max_tokens, temperature=temperature if sample else 0.0,
                              top_p=float(kw.pop("top_p", 1.0) or 1.0) if sample else 1.0,
                              stop=tuple(s for s in until if s), seed=kw.pop("seed", None) if sample else None)
