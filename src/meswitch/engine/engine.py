"""The multi-expert engine: one base model, many compressed experts, continuous batching.

Each :meth:`Engine.step` admits waiting requests into free KV-cache slots (loading their experts
if needed), runs one forward over the prompts being prefilled and the sequences being decoded,
samples one token per sequence and returns the new text as :class:`StreamEvent` s (with the chosen
tokens' log-probabilities for requests that ask, and the prompt's, from the same forward's logits of
every prompt position, for requests that score their prompt). Requests join
and leave between steps; a request that fails (its expert cannot be loaded, say) ends with
``finish_reason="error"`` and the others in its batch go on.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meswitch.engine.backends import select as select_backend
from meswitch.engine.base_blocks import attach_gguf_base
from meswitch.engine.errors import (
    ContextLengthError,
    EngineOverloadedError,
    InvalidRequestError,
    PromptTooLongError,
)
from meswitch.engine.experts import FULL, LOADING, RESIDENT, ExpertPool
from meswitch.engine.logprobs import TokenPieces, chosen_logprobs, prompt_logprobs
from meswitch.engine.model import SeqSlice, ServingModel, StepBatch
from meswitch.engine.request import (
    ROLES,
    Completion,
    Echo,
    InvalidPromptError,
    Request,
    Route,
    StreamEvent,
    TokenLogprob,
    Usage,
)
from meswitch.engine.sampling import sample
from meswitch.engine.segments import Segments
from meswitch.store import DeltaStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Limits and residency policy.

    ``max_context`` None: the model's, capped at 4096; ``max_prompt_tokens`` None: only the context
    limits prompts. ``max_resident_bytes``: budget for experts'
    deltas in memory (None: unlimited); others are loaded from the store on demand, least recently
    used out first. ``max_merged``: experts that may also keep merged ``W_base + delta`` weights (a
    full copy of the linear weights each), given to an expert once it has had the batch to itself for
    ``merge_after`` consecutive steps; they make such batches run at the base's speed (a base served from
    GGUF blocks, ``base_weights``, merges nothing: the blocks plus the delta are faster). ``backend``:
    how resident experts hold and apply their deltas in mixed batches, one of
    :data:`meswitch.engine.backends.BACKENDS` or ``"auto"`` (Triton on CUDA; on a CPU meswitch's
    low-bit kernel, ``bits / 8`` bytes per weight, else PyTorch's int4 kernel). Chosen once when the
    engine starts (:func:`meswitch.engine.backends.select`, which falls back and says why when the
    named one cannot run here; ``Engine.backend_selection``). ``prefetch``: how many waiting requests the
    engine looks at each step to start loading their experts on the background loader thread, so that
    reading experts overlaps the forward (0: an expert is loaded when its request is admitted, on the
    engine's thread, and the step waits for it). ``base_weights``: how the base holds its linear weights
    (:func:`meswitch.engine.base_blocks.attach_gguf_base`): ``"auto"`` serves every layer whose weight is
    bit for bit a GGUF tensor of a type with a kernel from that tensor's blocks (``base_gguf``, default the
    packaged SmolLM2 file; a float32 base on a CPU), ``"gguf"`` the same or an error, ``"dense"`` the
    checkpoint's weights as loaded (``Engine.base_weights`` says what was done and why). Measurements
    behind these defaults: docs/engine.md.
    """

    max_batch: int = 16
    max_context: int | None = None
    max_prompt_tokens: int | None = None
    max_waiting: int = 1024
    max_resident_bytes: int | None = None
    max_merged: int = 3
    merge_after: int = 16
    backend: str = "auto"
    verify: bool = True
    prefetch: int = 16
    base_weights: str = "auto"
    base_gguf: str | None = None


@dataclass(eq=False)
class _Seq:
    req: Request
    prompt_ids: list[int]
    expert: int  # -1: base
    arrival: float
    route: Route | None = None
    out_ids: list[int] = field(default_factory=list)
    slot: int = -1
    sent: int = 0  # characters of text already emitted
    tok_sent: int = 0  # generated token ids already emitted
    text: str = ""
    first_token: float | None = None
    generator: torch.Generator | None = None
    acquired: bool = False
    out_lps: list[TokenLogprob] = field(default_factory=list)  # one per out_ids entry, when params.logprobs asked
    echo: Echo | None = None  # the prompt handed back (Request.echo), once known
    echo_sent: bool = False
    waited: bool = False  # passed over at admission while its expert was loading

    @property
    def cached(self) -> int:
        return len(self.prompt_ids) + len(self.out_ids) - 1 if self.out_ids else 0


class Engine:
    """Serve the experts of a :class:`DeltaStore` over one base model (module docstring)."""

    def __init__(
        self, store: DeltaStore, base: Any, tokenizer: Any, config: EngineConfig | None = None,
        check_base: bool = True,
    ) -> None:
        """``base``: the Hugging Face model the store's deltas were made against (checked by fingerprint)."""
        self.config = config = config or EngineConfig()
        if check_base:
            from meswitch.store import fingerprint_model

            DeltaStore.open(store.path, expect_fingerprint=fingerprint_model(base))
        if config.max_batch < 1:
            raise InvalidRequestError(f"max_batch must be >= 1, got {config.max_batch}")
        self.store, self.tokenizer = store, tokenizer
        self.backend_selection = select_backend(config.backend, _device_of(base))
        log.info("%s", self.backend_selection.describe())
        self.model = ServingModel(base, self.backend_selection.backend)
        self.base_weights = attach_gguf_base(self.model, config.base_weights, config.base_gguf)
        log.info("%s", self.base_weights.describe())
        limit = min(int(getattr(base.config, "max_position_embeddings", 4096) or 4096), 4096)
        self.max_context = config.max_context or limit
        self.pool = ExpertPool(store, self.model, config.max_resident_bytes, config.max_merged, config.verify)
        self.cache = self.model.new_cache(config.max_batch, self.max_context)
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._aborted: set[str] = set()
        self._solo = (-1, 0)  # (expert, consecutive steps it had the batch to itself)
        self._eos = _eos_ids(base, tokenizer)
        vocab = tokenizer.get_vocab()
        self._max_token_chars = max((len(t) for t in vocab), default=16) or 16
        self._vocab = min(len(vocab), int(getattr(base.config, "vocab_size", len(vocab)) or len(vocab)))
        self._pieces = TokenPieces(tokenizer)  # token id -> (text, raw bytes), filled on demand
        self.counters = {"requests": 0, "finished": 0, "errors": 0, "prompt_tokens": 0, "generated_tokens": 0,
                         "steps": 0}

    @classmethod
    def from_store(
        cls, store: DeltaStore | str | os.PathLike, base: str | os.PathLike | None = None,
        config: EngineConfig | None = None,
    ) -> Engine:
        """Open ``store``, load its base (``base`` or the path recorded in the store) and check they match.

        With ``config.verify`` (default) every expert file's presence and size is checked here (a warning
        names the broken ones, whose requests will fail) and its SHA-256 at its first load."""
        from meswitch.model.checkpoint import load_checkpoint
        from meswitch.store import fingerprint_model

        if not isinstance(store, DeltaStore):
            store = DeltaStore.open(store)
        if base is None:
            recorded = store.extra.get("base_path")
            if not recorded:
                raise InvalidRequestError(f"{store.path}: the store records no base model path; pass base=")
            base = Path(recorded)
        model, tokenizer = load_checkpoint(Path(base))
        DeltaStore.open(store.path, expect_fingerprint=fingerprint_model(model))
        if config is None or config.verify:
            # Sizes now, hashes at each file's first load: start-up does not read every expert of a large
            # store, and a broken file fails its expert's requests while the others serve.
            problems = store.check_files()
            if problems:
                log.warning("%s: %d of %d expert files cannot be served; requests for them will fail:\n  %s",
                            store.path, len(problems), len(store.experts), "\n  ".join(problems))
        return cls(store, model, tokenizer, config, check_base=False)

    # ---- API -----------------------------------------------------------------------------------

    @property
    def experts(self) -> list[str]:
        return list(self.pool.names)

    def add_request(self, request: Request) -> str:
        """Validate and queue ``request``; returns its id. Raises a specific error if it is bad."""
        if len(self._waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"{len(self._waiting)} requests are waiting (max_waiting={self.config.max_waiting})")
        seq = self._prepare(request)
        self._waiting.append(seq)
        self.counters["requests"] += 1
        self.counters["prompt_tokens"] += len(seq.prompt_ids)
        return request.request_id

    def describe_request(self, request_id: str) -> tuple[str | None, Route | None]:
        """(expert name or None for the base, routing decision or None) of a queued or running request."""
        for s in (*self._waiting, *self._running):
            if s.req.request_id == request_id:
                return (None if s.expert < 0 else self.pool.names[s.expert]), s.route
        raise KeyError(f"no waiting or running request {request_id!r}")

    def abort(self, request_id: str) -> None:
        """Cancel a waiting or running request; it ends with ``finish_reason="cancelled"`` at the next step."""
        self._aborted.add(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def generate(self, requests: Sequence[Request] | Request) -> list[Completion]:
        """Run ``requests`` to completion together; completions in the order given."""
        reqs = [requests] if isinstance(requests, Request) else list(requests)
        for r in reqs:
            self.add_request(r)
        want = {r.request_id for r in reqs}
        done: dict[str, Completion] = {}
        while want - done.keys():
            for ev in self.step():
                if ev.completion is not None and ev.request_id in want:
                    done[ev.request_id] = ev.completion
        return [done[r.request_id] for r in reqs]

    def stream(self, request: Request) -> Iterator[StreamEvent]:
        """Yield ``request``'s events as they are produced (other queued requests advance too)."""
        rid = self.add_request(request)
        while True:
            for ev in self.step():
                if ev.request_id == rid:
                    yield ev
                    if ev.finished:
                        return

    def stats(self) -> dict[str, Any]:
        """Counters, queue depths, the delta backend in use and expert residency (JSON-able)."""
        return {**self.counters, "waiting": len(self._waiting), "running": len(self._running),
                "backend": self.backend_selection.backend.describe(), "base": self.base_weights.as_dict(),
                "experts": self.pool.snapshot()}

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[StreamEvent]:
        """Admit, run one forward, sample, and return the new output of every request that has some."""
        events = self._reap_aborted()
        events += self._admit()
        if not self._running:
            return events
        # Sequences grouped by expert: every layer's segments are then contiguous, no gather/scatter.
        step = sorted(self._running, key=lambda q: q.expert)
        slices = []
        ids: list[int] = []
        rows: list[int] = []  # the token rows whose logits the forward returns: every sequence's last ...
        scored: list[tuple[_Seq, int]] = []  # ... and every position of prefills that score their prompt
        last: list[int] = []  # per sequence, the index in rows of its last token
        for s in step:
            n = 1 if s.out_ids else len(s.prompt_ids)
            if s.out_ids:
                slices.append(SeqSlice(s.slot, s.cached, 1, s.expert))
                ids.append(s.out_ids[-1])
            else:
                slices.append(SeqSlice(s.slot, 0, n, s.expert))
                ids.extend(s.prompt_ids)
            if not s.out_ids and s.req.params.prompt_logprobs is not None:
                scored.append((s, len(rows)))
                rows.extend(range(len(ids) - n, len(ids)))
            else:
                rows.append(len(ids) - 1)
            last.append(len(rows) - 1)
        self.cache.reserve(min(max(sl.start + sl.n for sl in slices) + 1, self.cache.max_len))
        device = self.model.device
        batch = StepBatch.build(slices, device)
        if scored:  # each output row's expert: sequence i owns rows last[i-1]+1 .. last[i]
            ends = [-1, *last]
            row_experts = tuple(q.expert for i, q in enumerate(step) for _ in range(ends[i + 1] - ends[i]))
            batch = _RowsBatch(batch.seqs, batch.segments, batch.expert_rows, batch.positions,
                               torch.tensor(rows, device=device), row_experts)
        logits = self.model(torch.tensor(ids, device=device), batch, self.cache)  # [R, V], R = len(rows)
        if scored:
            for s, r0 in scored:
                s.echo = self._score_prompt(s, logits[r0 : r0 + len(s.prompt_ids)])
            logits = logits.index_select(0, torch.tensor(last, device=logits.device))  # [S, V]
        tokens = self._sample(logits, step)
        lps = self._logprobs(logits, tokens, step)
        self.counters["steps"] += 1
        self._note_solo(batch.segments.single_expert)
        now = time.perf_counter()
        for s, tok, lp in zip(step, tokens, lps, strict=True):
            if s.req.params.max_tokens == 0:  # the prompt scored, nothing to generate
                events.append(self._finish(s, "length"))
                continue
            if tok is None:
                events.append(self._finish(s, "error", "sampling failed for this request"))
                continue
            if s.first_token is None:
                s.first_token = now
            s.out_ids.append(tok)
            if lp is not None:
                s.out_lps.append(lp)
            self.counters["generated_tokens"] += 1
            events.append(self._advance(s, tok))
        return [e for e in events if e is not None]

    # ---- log-probabilities ---------------------------------------------------------------------

    def _logprobs(self, logits: torch.Tensor, tokens: list[int | None], step: list[_Seq]) -> list[TokenLogprob | None]:
        """Per sequence (``logits: [S, V]``), the chosen token's :class:`TokenLogprob` where its request asks."""
        return chosen_logprobs(self._pieces, logits, tokens, [s.req.params.logprobs for s in step])

    def _score_prompt(self, s: _Seq, logits: torch.Tensor) -> Echo:
        """The prompt's tokens with their log-probabilities; ``logits: [P, V]``, row ``j`` predicting token ``j + 1``."""
        return Echo(self._prompt_text(s), prompt_logprobs(self._pieces, s.prompt_ids, logits,
                                                          s.req.params.prompt_logprobs or 0))

    def _prompt_text(self, s: _Seq) -> str:
        r = s.req
        return r.prompt if r.prompt is not None else self.tokenizer.decode(s.prompt_ids, skip_special_tokens=False)

    def _event(self, s: _Seq, delta: str, comp: Completion | None = None) -> StreamEvent:
        """The event carrying ``delta`` and the tokens not yet sent (with their log-probabilities), and the
        prompt on the request's first event when it asked for it."""
        toks, lps = s.out_ids[s.tok_sent :], s.out_lps[s.tok_sent :]
        s.tok_sent = len(s.out_ids)
        echo = None
        if s.echo is not None and not s.echo_sent:
            echo, s.echo_sent = s.echo, True
        return StreamEvent(s.req.request_id, delta, toks, comp,
                           lps if s.req.params.logprobs is not None else None, echo)

    def _note_solo(self, single: int | None) -> None:
        """Merge an expert's weights once it has had ``merge_after`` consecutive steps to itself, unless the
        base is served from GGUF blocks: a merged float32 copy then reads more bytes per step than the
        blocks plus the expert's low-bit delta (measured on the 135M base: 11.0 against 14.4 tok/s at batch 1,
        the same at batch 16) and holds a full float32 copy of the linear weights."""
        if single is None or single < 0:
            self._solo = (-1, 0)
            return
        e, n = self._solo
        self._solo = (single, n + 1 if e == single else 1)
        if self._solo[1] == self.config.merge_after and not self.base_weights.tensors:
            self.pool.merge(single)

    def _sample(self, logits: torch.Tensor, step: list[_Seq]) -> list[int | None]:
        """Next token per sequence; if the batch call fails, row by row, so one bad row fails alone."""
        try:
            return sample(logits, [s.req.params for s in step], [s.generator for s in step]).tolist()
        except RuntimeError:
            out: list[int | None] = []
            for i, s in enumerate(step):
                try:
                    out.append(int(sample(logits[i : i + 1], [s.req.params], [s.generator])[0]))
                except RuntimeError:
                    out.append(None)
            return out

    def _advance(self, s: _Seq, tok: int) -> StreamEvent | None:
        p = s.req.params
        reason = None
        if tok in self._eos and not p.ignore_eos:
            s.out_ids.pop()
            del s.out_lps[len(s.out_ids) :]
            reason = "stop"
        text = self.tokenizer.decode(s.out_ids, skip_special_tokens=True)
        hit = _find_stop(text, p.stop, max(0, s.sent - max((len(x) for x in p.stop), default=0)))
        if hit is not None:
            text, reason = text[:hit], "stop"
        elif reason is None and (len(s.out_ids) >= p.max_tokens or s.cached + 1 >= self.max_context):
            reason = "length"
        s.text = text
        if reason is not None:
            return self._finish(s, reason)
        hold = max((len(x) for x in p.stop), default=1) - 1
        safe = len(text) - hold
        while safe > s.sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for more
            safe -= 1
        if safe <= s.sent:
            if s.echo is not None and not s.echo_sent:  # the prompt goes out now, the held text later
                s.echo_sent = True
                return StreamEvent(s.req.request_id, "", [], None, [] if p.logprobs is not None else None, s.echo)
            return None
        delta, s.sent = text[s.sent : safe], safe
        return self._event(s, delta)

    def _finish(self, s: _Seq, reason: str, error: str | None = None) -> StreamEvent:
        if s in self._running:
            self._running.remove(s)
        if s.slot >= 0:
            self.cache.free(s.slot)
            s.slot = -1
        if s.acquired:
            self.pool.release(s.expert)
            s.acquired = False
        now = time.perf_counter()
        comp = Completion(
            request_id=s.req.request_id, text=s.text, token_ids=list(s.out_ids), finish_reason=reason,
            expert=None if s.expert < 0 else self.pool.names[s.expert],
            usage=Usage(len(s.prompt_ids), len(s.out_ids)), route=s.route, error=error,
            ttft_s=None if s.first_token is None else s.first_token - s.arrival, latency_s=now - s.arrival,
            logprobs=list(s.out_lps) if s.req.params.logprobs is not None else None, echo=s.echo,
        )
        self.counters["finished"] += 1
        self.counters["errors"] += reason == "error"
        delta, s.sent = s.text[s.sent :], len(s.text)
        return self._event(s, delta, comp)

    def _reap_aborted(self) -> list[StreamEvent]:
        if not self._aborted:
            return []
        events = []
        for s in [*self._waiting, *self._running]:
            if s.req.request_id in self._aborted:
                if s in self._waiting:
                    self._waiting.remove(s)
                events.append(self._finish(s, "cancelled"))
        self._aborted.clear()
        return events

    def _admit(self) -> list[StreamEvent]:
        """Admit waiting requests into free slots, first come first served, loading their experts.

        With ``config.prefetch`` the experts of the first ``prefetch`` waiting requests start loading on
        the background loader first; a request whose expert is still loading is passed over while the
        batch has other work (those behind it whose experts are resident go in), and waited for when it
        has none. A request whose expert cannot be loaded ends with ``"error"``, as does every waiting
        request for that expert; the budget full of busy experts makes the queue wait.
        """
        if self.config.prefetch <= 0:
            return self._admit_loading_here()
        events: list[StreamEvent] = []
        pool = self.pool
        pool.poll()
        events += self._fail_experts(pool.failed())
        window = self._prefetch()
        passed: deque[_Seq] = deque()
        while self._waiting and self.cache.free_slots:
            s = self._waiting.popleft()
            if s.expert >= 0:
                try:
                    got = pool.claim(s.expert, wait=not self._running, protect=window)
                except Exception as exc:  # noqa: BLE001 - a broken expert fails its requests, not the engine
                    events += self._fail_experts([s.expert], exc, [s])
                    continue
                if got == LOADING:
                    s.waited = True
                    passed.append(s)
                    continue
                if got == FULL:
                    passed.append(s)
                    break  # the budget is full of busy experts: wait for one to finish
                pool.note(s.expert, hit=got == RESIDENT and not s.waited)
                s.acquired = True
            s.slot = self.cache.allocate()
            self._running.append(s)
        self._waiting.extendleft(reversed(passed))
        return events

    def _prefetch(self) -> set[int]:
        """Start background loads of the experts of the first ``config.prefetch`` waiting requests, in
        order, while the loader takes them and the budget has room; returns those experts (which the
        loads must not evict)."""
        window: list[int] = []
        for s in itertools.islice(self._waiting, self.config.prefetch):
            if s.expert >= 0 and s.expert not in window:
                window.append(s.expert)
        protect = set(window)
        for e in window:
            if self.pool.is_resident(e) or e in self.pool.failed():
                continue
            if len(self.pool.loading()) >= self.pool.max_loading or not self.pool.start_load(e, protect):
                break
        return protect

    def _fail_experts(self, experts: Sequence[int], exc: BaseException | None = None,
                      seqs: Iterable[_Seq] = ()) -> list[StreamEvent]:
        """End ``seqs`` and every waiting request for one of ``experts`` with ``"error"``: its expert could
        not be loaded (``exc``, else the error of its failed background load)."""
        events = []
        for e in experts:
            err = exc if exc is not None else self.pool.claim_error(e)
            why = f"expert {self.pool.names[e]!r} could not be loaded: {type(err).__name__}: {err}"
            doomed = [*[s for s in seqs if s.expert == e], *[s for s in self._waiting if s.expert == e]]
            for s in doomed:
                if s in self._waiting:
                    self._waiting.remove(s)
                events.append(self._finish(s, "error", why))
        return events

    def _admit_loading_here(self) -> list[StreamEvent]:
        """``_admit`` without the background loader: experts load on this thread as their requests go in."""
        events = []
        while self._waiting and self.cache.free_slots:
            s = self._waiting[0]
            if s.expert >= 0:
                try:
                    if not self.pool.acquire(s.expert):
                        break  # the budget is full of busy experts: wait for one to finish
                except Exception as exc:  # noqa: BLE001 - a broken expert fails its request, not the engine
                    self._waiting.popleft()
                    events.append(self._finish(s, "error", f"{type(exc).__name__}: {exc}"))
                    continue
                s.acquired = True
            self._waiting.popleft()
            s.slot = self.cache.allocate()
            self._running.append(s)
        return events

    # ---- validation ----------------------------------------------------------------------------

    def _prepare(self, r: Request) -> _Seq:
        if not isinstance(r, Request):
            raise InvalidRequestError(f"expected a Request, got {type(r).__name__}")
        ids = self._tokenize(r)
        p = r.params
        if self.config.max_prompt_tokens is not None and len(ids) > self.config.max_prompt_tokens:
            raise PromptTooLongError(len(ids), self.config.max_prompt_tokens)
        if len(ids) + p.max_tokens > self.max_context:
            raise ContextLengthError(len(ids), p.max_tokens, self.max_context)
        name = r.expert
        if r.route is not None and r.route.expert != name:
            raise InvalidRequestError(f"the request names expert {name!r} but its route chose {r.route.expert!r}")
        idx = -1 if name is None else self.pool.lookup(name)
        gen = None
        if not p.greedy:
            gen = torch.Generator().manual_seed(p.seed if p.seed is not None else int.from_bytes(os.urandom(7), "big"))
        seq = _Seq(r, ids, idx, time.perf_counter(), route=r.route, generator=gen)
        if r.echo and p.prompt_logprobs is None:  # only the text: known now (with logprobs: after the prefill)
            seq.echo = Echo(self._prompt_text(seq), ())
        return seq

    def _tokenize(self, r: Request) -> list[int]:
        """The prompt's token ids (the prompt as is, its token ids, or the messages through the chat template)."""
        if sum(x is not None for x in (r.prompt, r.prompt_token_ids, r.messages)) != 1:
            raise InvalidRequestError("give exactly one of prompt, prompt_token_ids and messages")
        if r.prompt_token_ids is not None:
            ids = r.prompt_token_ids
            if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
                raise InvalidPromptError("prompt token ids must be a non-empty list of ints")
            bad = next((t for t in ids if not 0 <= t < self._vocab), None)
            if bad is not None:
                raise InvalidPromptError(f"token id {bad} is outside the vocabulary [0, {self._vocab})")
            return list(ids)
        if r.prompt is not None:
            if not isinstance(r.prompt, str) or not r.prompt:
                raise InvalidPromptError("prompt must be a non-empty string")
            self._check_chars(len(r.prompt))
            return list(self.tokenizer(r.prompt)["input_ids"])
        msgs = r.messages
        if not isinstance(msgs, list) or not msgs:
            raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}] must be {{'role': one of {list(ROLES)}, 'content': str}}")
        if not any(m["content"] for m in msgs):
            raise InvalidRequestError("every message is empty")
        self._check_chars(sum(len(m["content"]) for m in msgs))
        rendered = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def _check_chars(self, n: int) -> None:
        # No token spans more than _max_token_chars characters: longer text cannot fit, skip tokenizing it.
        if n > self.max_context * self._max_token_chars:
            raise ContextLengthError(n // self._max_token_chars, 0, self.max_context)


@dataclass(frozen=True, eq=False)
class _RowsBatch(StepBatch):
    """A step whose output rows (``last_rows``, ``[R]``) are every sequence's last token and, for the
    prefills that score their prompt, every prompt position; ``out_experts``: the expert of each output row."""

    out_experts: tuple[int, ...] = ()

    def last_segments(self) -> Segments:
        return Segments.from_ids(list(self.out_experts))


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None)
        ids.update(e if isinstance(e, (list, tuple)) else [] if e is None else [e])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _find_stop(text: str, stops: Iterable[str], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
