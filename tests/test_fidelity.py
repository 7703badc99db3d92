"""Fidelity of a candidate against a reference: the chunked computation against the whole at once."""

import math

import pytest
import torch
import torch.nn.functional as F

from meswitch.eval.fidelity import compare_to_states, reference_states
from tests.conftest import tiny_llama
from tests.engine_helpers import perturbed


def test_chunks_of_tokens_give_the_whole_vocabulary_figures():
    ref = tiny_llama(layers=2)
    cand = perturbed(ref, 4, rel=0.2)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, :9] = False
    states = reference_states(ref, [(ids, mask, None)])
    got = compare_to_states(states, ref.get_output_embeddings(), cand, chunk=7)  # 7-token chunks, one partial
    with torch.no_grad():  # slow reference: every scored token's log-probabilities at once
        lp_r = F.log_softmax(ref(ids).logits[:, :-1][mask[:, 1:]], -1)
        lp_c = F.log_softmax(cand(ids).logits[:, :-1][mask[:, 1:]], -1)
    target = ids[:, 1:][mask[:, 1:]]
    n = len(target)
    assert got.tokens == n == 2 * 29 - 8
    # float32 sums of near-equal log-probabilities: agreement to ~1e-5 depends on the thread count
    assert got.kl == pytest.approx(float((lp_r.exp() * (lp_r - lp_c)).sum()) / n, rel=1e-4)
    assert got.top1 == float((lp_r.argmax(-1) == lp_c.argmax(-1)).sum()) / n
    nll = [-float(lp.gather(1, target[:, None]).sum()) for lp in (lp_r, lp_c)]
    assert got.ppl_ratio == pytest.approx(math.exp((nll[1] - nll[0]) / n), rel=1e-5)
