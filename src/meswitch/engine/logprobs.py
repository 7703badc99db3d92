"""Log-probabilities as the engine hands them out: each token with its text, raw bytes and top alternatives.

:class:`TokenPieces` turns token ids into (text, bytes) once per id; :func:`chosen_logprobs` and
:func:`prompt_logprobs` read a step's logits (``log_softmax`` in float32, no temperature or top_p:
the model's own distribution, as vLLM reports by default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from meswitch.engine.request import TokenLogprob, TopLogprob
from meswitch.engine.sampling import token_logprobs


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character that stands for each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = _bytes_to_unicode()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_piece(tokenizer: Any, tid: int) -> tuple[str, bytes]:
    """(``decode([tid])``, the token's raw bytes): a token holding part of a UTF-8 character decodes to U+FFFD;
    its bytes then come from the byte-level BPE alphabet or a SentencePiece ``<0xNN>`` byte token."""
    text = tokenizer.decode([tid], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text, text.encode()
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(tid) if convert is not None else None
    if isinstance(piece, str):
        if m := _BYTE_TOKEN.fullmatch(piece):
            return text, bytes([int(m.group(1), 16)])
        if piece and all(c in _BYTE_DECODER for c in piece):
            return text, bytes(_BYTE_DECODER[c] for c in piece)
    return text, text.encode()


class TokenPieces:
    """Token id -> (text, raw bytes) of one tokenizer, each id decoded once."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, tid: int) -> tuple[str, bytes]:
        hit = self._cache.get(tid)
        if hit is None:
            hit = self._cache[tid] = token_piece(self.tokenizer, tid)
        return hit

    def token(self, tid: int, lp: float | None, top_ids: Sequence[int] = (), top_lp: Sequence[float] = ()
              ) -> TokenLogprob:
        """``tid`` with its log-probability and its alternatives ``(top_ids, top_lp)``, each with text and bytes."""
        tops = tuple(TopLogprob(i, *self(i), v) for i, v in zip(top_ids, top_lp, strict=True))
        return TokenLogprob(tid, *self(tid), lp, tops)


def chosen_logprobs(pieces: TokenPieces, logits: torch.Tensor, tokens: Sequence[int | None],
                    top_k: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Per row of ``logits: [S, V]``, the sampled ``tokens[i]`` with its log-probability and ``top_k[i]``
    alternatives; None for rows whose request asks for none (``top_k[i] is None``) or that sampled none."""
    want = [i for i, (t, k) in enumerate(zip(tokens, top_k, strict=True)) if t is not None and k is not None]
    out: list[TokenLogprob | None] = [None] * len(tokens)
    if not want:
        return out
    k = max(top_k[i] or 0 for i in want)
    rows = logits.index_select(0, torch.tensor(want, device=logits.device))
    chosen = torch.tensor([tokens[i] for i in want], device=logits.device)
    lp, top_ids, top_lp = (t.tolist() for t in token_logprobs(rows, chosen, k))
    for j, i in enumerate(want):
        kk = top_k[i] or 0
        out[i] = pieces.token(int(tokens[i]), lp[j], top_ids[j][:kk], top_lp[j][:kk])  # type: ignore[arg-type]
    return out


def prompt_logprobs(pieces: TokenPieces, ids: Sequence[int], logits: torch.Tensor, k: int) -> tuple[TokenLogprob, ...]:
    """A prompt's tokens with their log-probabilities: ``logits: [P, V]`` of the ``P = len(ids)`` prompt
    positions, row ``j`` predicting token ``j + 1``; the first token has none (None), as OpenAI's echo."""
    first = pieces.token(ids[0], None)
    if len(ids) == 1:
        return (first,)
    lp, top_ids, top_lp = (t.tolist() for t in token_logprobs(logits[:-1], torch.tensor(list(ids[1:])), k))
    return (first, *(pieces.token(t, lp[j], top_ids[j], top_lp[j]) for j, t in enumerate(ids[1:])))
