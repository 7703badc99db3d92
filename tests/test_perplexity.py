import math

import torch
import torch.nn.functional as F

from meswitch.data.chat import render
from meswitch.data.examples import Example
from meswitch.eval.perplexity import perplexity
from meswitch.model.lm import masked_nll
from tests.conftest import tiny_llama


class _CharTok:
    """Token id = byte value mod 128: enough for raw-text examples on a vocab-128 model."""

    def __call__(self, text):
        return {"input_ids": [b % 128 for b in text.encode()]}


def _reference_ppl(model, examples):
    total, count = 0.0, 0
    for e in examples:
        torch.set_grad_enabled(False)
        ids = torch.tensor([_CharTok()(e.text)["input_ids"]])
        logits = model(ids).logits[0, :-1]
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    torch.set_grad_enabled(True)
    return math.exp(total / count)


def test_perplexity_matches_full_logits_reference():
    model = tiny_llama()
    exs = [Example("a short one", "general"), Example("and a somewhat longer example text", "general"),
           Example("mid size text", "general")]
    ref = _reference_ppl(model, exs)
    for bs in (1, 2, 8):  # padding must not change the result
        assert math.isclose(perplexity(model, _CharTok(), exs, batch_size=bs), ref, rel_tol=1e-5)


def test_masked_nll_scores_only_marked_positions():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 5] = mask[1, 11] = True
    nll, n = masked_nll(model, ids, mask)
    logits = model(ids).logits
    ref = F.cross_entropy(logits[0, 4], ids[0, 5], reduction="sum") + F.cross_entropy(
        logits[1, 10], ids[1, 11], reduction="sum"
    )
    assert n == 2
    assert torch.allclose(nll, ref, atol=1e-5)


def test_render_raw_text_uses_tokenizer():
    ids, mask = render(Example("ab", "general"), _CharTok())
    assert ids == [97, 98] and mask == [False, True]
