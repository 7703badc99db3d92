"""The experts as judges of their own domain: a text's likelihood under each expert, against the base's.

Shapes: ``N`` texts, ``C`` domains (one column per domain: the score of the expert it maps to),
``E`` distinct experts scored, ``L`` tokens of a text (at most ``max_tokens``), ``P`` prefix tokens.

``expert-lik`` features, per text ``i`` and domain ``c`` mapped to expert ``e``::

    lp_m(i) = mean_{t < L} log p_m(text_i[t] | prefix, text_i[:t])     # m = an expert, or the base
    features[i, c] = lp_e(i) - lp_base(i)

The ratio is the domain signal: a text every model finds likely (short, common words) scores near
0 for every expert; a text the math expert finds likelier than the base does scores high for math.
Every model's log-probabilities come from ONE mixed batch of the multi-expert engine
(:class:`meswitch.engine.Engine`): each text once per expert and once for the base, as prompts
scored with ``SamplingParams(max_tokens=0, prompt_logprobs=0)``; no second model forward exists here.

An expert that cannot be loaded (its file is missing or corrupt) ends its rows with an error in the
engine; its column is NaN and :attr:`ExpertLikelihoodEncoder.errors` says why. The router then
routes among the other domains and says so in the decision's ``warnings``.

``minilm+lik`` (:class:`CombinedEncoder`): the ``minilm`` features with the ``C`` likelihood
columns appended, ``[N, F_minilm + C]``, for one head over both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from meswitch.router.encoders import EncoderSpec, MiniLMEncoder, _batches
from meswitch.router.errors import RouterError

if TYPE_CHECKING:
    import torch

    from meswitch.engine.engine import Engine
    from meswitch.store import DeltaStore

LIKELIHOOD_KINDS = ("expert-lik", "minilm+lik")
DEFAULT_PREFIX = "<|im_start|>user\n"  # the chat turn a query sits in; the tokenizer's own when it has no such token


def query_prefix(tokenizer: Any, prefix: str) -> list[int]:
    """Token ids put before every text (so that the text's first token is scored too); never empty."""
    ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
    if not ids:
        eos = tokenizer.eos_token_id
        ids = [int(eos if eos is not None else 0)]
    return ids


class ExpertLikelihoodEncoder:
    """``encode(texts) -> [N, C]``: each domain's expert's mean token log-probability of the text minus the base's.

    ``experts[c]``: the expert whose likelihood scores domain ``c``. ``engine``: an :class:`Engine`
    over the store this encoder scores with (built from ``store`` and ``base`` with delta ``backend``
    when not given; ``"auto"`` is what serving uses, ``"reference"`` the exact one); it is this
    encoder's own: do not step it from another thread.
    """

    kind = "expert-lik"

    def __init__(self, store: DeltaStore, base: tuple[Any, Any], experts: Sequence[str], max_tokens: int = 48,
                 prefix: str = DEFAULT_PREFIX, batch_texts: int = 4, engine: Engine | None = None,
                 backend: str = "auto"):
        if len(experts) < 2:
            raise RouterError(f"expert-lik needs at least 2 domains, got {len(experts)}")
        unknown = sorted(set(experts) - set(store.experts))
        if unknown:
            raise RouterError(f"expert-lik scores with experts {unknown} that the store does not hold ({store.experts})")
        model, tok = base
        self.experts, self.max_tokens, self.prefix = list(experts), max_tokens, prefix
        self.tokenizer = tok
        self.prefix_ids = query_prefix(tok, prefix)
        self.scored = sorted(set(self.experts))  # each distinct expert once, then the base
        self.batch_texts = batch_texts
        self.engine = engine or scoring_engine(store, model, tok, rows=batch_texts * (len(self.scored) + 1),
                                               max_len=len(self.prefix_ids) + max_tokens + 1, backend=backend)
        self.errors: dict[str, str] = {}  # expert -> why it could not be scored, in the last encode

    def spec(self) -> dict[str, Any]:
        return EncoderSpec(self.kind, self.max_tokens, {"experts": self.experts, "prefix": self.prefix}).to_dict()

    def token_ids(self, text: str) -> list[int]:
        """The text's first ``max_tokens`` token ids (at least one)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        return list(ids) or [int(self.tokenizer.eos_token_id or 0)]

    def token_logprobs(self, texts: Sequence[str], batch_size: int | None = None,
                       progress: bool = False) -> tuple[list[torch.Tensor], dict[str, str]]:
        """``([E + 1, L_i] per text], errors)``: each text token's log-probability under each of
        ``self.scored`` (sorted), then the base (last row), from one engine batch per ``batch_size``
        texts; a row of NaN where an expert failed, ``errors`` saying why (expert -> message)."""
        import torch

        from meswitch.engine.request import Request
        from meswitch.engine.sampling import SamplingParams

        models: list[str | None] = [*self.scored, None]
        out: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        errors: dict[str, str] = {}
        params = SamplingParams(max_tokens=0, prompt_logprobs=0)
        p = len(self.prefix_ids)
        for idx, chunk in _batches(texts, batch_size or self.batch_texts, progress, "expert-lik"):
            toks = [self.token_ids(t) for t in chunk]
            reqs = [Request(prompt_token_ids=self.prefix_ids + t, expert=m, params=params)
                    for t in toks for m in models]  # text-major: request = i * (E + 1) + m
            done = self.engine.generate(reqs)
            for i, t in enumerate(toks):
                rows = torch.full((len(models), len(t)), float("nan"))
                for m, c in enumerate(done[i * len(models) : (i + 1) * len(models)]):
                    if c.finish_reason == "error" or c.echo is None:
                        if models[m] is None:
                            raise RouterError(f"expert-lik could not score the base model: {c.error}")
                        errors.setdefault(str(models[m]), c.error or c.finish_reason)
                        continue
                    rows[m] = torch.tensor([tl.logprob for tl in c.echo.tokens[p:]])
                out[idx[i]] = rows
        return out, errors

    def mean_logprobs(self, texts: Sequence[str], batch_size: int | None = None,
                      progress: bool = False) -> tuple[torch.Tensor, dict[str, str]]:
        """``([N, E + 1], errors)``: :meth:`token_logprobs` averaged over each text's tokens."""
        import torch

        per_token, errors = self.token_logprobs(texts, batch_size, progress)
        if not per_token:
            return torch.empty(0, len(self.scored) + 1), errors
        return torch.stack([lp.mean(1) for lp in per_token]), errors

    def encode(self, texts: Sequence[str], batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
        """``texts`` -> ``[N, C]``: ``lp_expert(c) - lp_base`` per domain column; NaN for an expert that failed."""
        lp, self.errors = self.mean_logprobs(texts, batch_size, progress)
        cols = [self.scored.index(e) for e in self.experts]
        return lp[:, cols] - lp[:, -1:]


class CombinedEncoder:
    """``minilm`` features, then the ``expert-lik`` columns: ``[N, F_minilm + C]`` for one head over both."""

    kind = "minilm+lik"

    def __init__(self, minilm: MiniLMEncoder, lik: ExpertLikelihoodEncoder):
        self.minilm, self.lik = minilm, lik

    @property
    def errors(self) -> dict[str, str]:
        return self.lik.errors

    @property
    def experts(self) -> list[str]:
        return self.lik.experts

    def spec(self) -> dict[str, Any]:
        m, lik = self.minilm.spec(), self.lik.spec()
        return EncoderSpec(self.kind, lik["max_tokens"], {"minilm": m, **lik["options"]}).to_dict()

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        import torch

        return torch.cat([self.minilm.encode(texts, batch_size, progress), self.lik.encode(texts, None, progress)], 1)


def scoring_engine(store: DeltaStore, model: Any, tokenizer: Any, rows: int, max_len: int,
                   backend: str = "auto") -> Engine:
    """An :class:`Engine` sized for scoring: ``rows`` prompts of at most ``max_len`` tokens per step, no merged
    weights; experts are loaded (and verified) when first scored, so a broken one fails only its own rows."""
    from meswitch.engine.engine import Engine, EngineConfig

    cfg = EngineConfig(max_batch=rows, max_context=max_len, max_waiting=1 << 20, max_merged=0, backend=backend)
    return Engine(store, model, tokenizer, cfg, check_base=False)


def build_likelihood_encoder(spec: EncoderSpec, domains: Sequence[str], base: tuple[Any, Any],
                             store: DeltaStore) -> ExpertLikelihoodEncoder | CombinedEncoder:
    """The ``expert-lik`` or ``minilm+lik`` encoder ``spec`` describes, scoring with ``store``'s experts."""
    experts = [str(e) for e in spec.options.get("experts") or domains]
    if len(experts) != len(domains):
        raise RouterError(f"{spec.kind}: {len(experts)} experts for {len(domains)} domains")
    lik = ExpertLikelihoodEncoder(store, base, experts, max_tokens=spec.max_tokens,
                                  prefix=str(spec.options.get("prefix", DEFAULT_PREFIX)))
    if spec.kind == "expert-lik":
        return lik
    m = EncoderSpec.from_dict(spec.options["minilm"])
    return CombinedEncoder(MiniLMEncoder(max_tokens=m.max_tokens, int8=bool(m.options.get("int8", True)),
                                         layers=m.options.get("layers", ())), lik)
