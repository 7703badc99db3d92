"""lm-evaluation-harness 0.4.13 end to end against the real server: ``local-completions`` on a
log-likelihood task and ``local-chat-completions`` on a generation task (the tiny local tasks in
``meswitch.harness.tasks``). The log-likelihoods lm-eval saw must equal transformers' on the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from meswitch.harness.tasks import TASKS_DIR
from tests.engine_helpers import EXPERTS, perturbed
from tests.server_helpers import tiny_served

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (the `eval` extra)")


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm_tokenizer):
    with tiny_served(tmp_path_factory.mktemp("lm_eval"), smollm_tokenizer, api_key=None) as s:
        yield s


def _evaluate(model, task: str, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=[task], task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                   log_samples=True, **kw)


def test_local_completions_loglikelihoods_equal_transformers(served, small_zoo, smollm_tokenizer):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    tok = smollm_tokenizer
    lm = LocalCompletionsAPI(base_url=served.url + "/v1/completions", model="code",
                             tokenizer=str(Path(small_zoo["paths"]["base"])), tokenizer_backend="huggingface",
                             max_length=256, num_concurrent=1, max_retries=1, batch_size=2)
    out = _evaluate(lm, "meswitch_tiny_mc")
    acc = out["results"]["meswitch_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"]["meswitch_tiny_mc"]
    assert len(samples) == 4
    code = perturbed(served.tiny[0], EXPERTS.index("code") + 1)
    seen = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            loglik = resp[0][0]
            whole = tok(context + continuation)["input_ids"]
            ctx = tok(context)["input_ids"]
            with torch.no_grad():
                lp = torch.log_softmax(code(torch.tensor([whole])).logits[0].float(), -1)
            want = sum(lp[j - 1, whole[j]].item() for j in range(len(ctx), len(whole)))
            assert math.isfinite(loglik) and loglik == pytest.approx(want, abs=1e-3), (context, continuation)
            seen += 1
    assert seen == 11  # every choice of every item


def test_local_chat_completions_generation_task_completes(served):
    from lm_eval.models.openai_completions import LocalChatCompletion

    lm = LocalChatCompletion(base_url=served.url + "/v1/chat/completions", model="math", num_concurrent=1,
                             max_retries=1)
    out = _evaluate(lm, "meswitch_tiny_gen", apply_chat_template=True)
    em = out["results"]["meswitch_tiny_gen"]["exact_match,none"]
    assert 0.0 <= em <= 1.0
    samples = out["samples"]["meswitch_tiny_gen"]
    assert len(samples) == 3 and all(isinstance(s["resps"][0][0], str) for s in samples)
