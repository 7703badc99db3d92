import pytest
import torch

from meswitch.data.chat import pack_blocks, render
from meswitch.data.examples import Example


def test_mask_covers_exactly_the_answer(smollm_tokenizer):
    tok = smollm_tokenizer
    ex = Example("What is 2+3?", "math", "2 + 3 = 5")
    ids, mask = render(ex, tok)
    assert len(ids) == len(mask)
    answer = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert answer.startswith("2 + 3 = 5") and "<|im_end|>" in answer
    prompt = tok.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert "What is 2+3?" in prompt and "2 + 3 = 5" not in prompt
    assert prompt.rstrip().endswith("assistant")


def test_whitespace_answer_does_not_merge_into_prompt(smollm_tokenizer):
    # BPE merges "\n" + " " when tokenized as one string; the prompt must still be a prefix.
    ids, mask = render(Example("e", "general", " "), smollm_tokenizer)
    prompt_only = smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "e"}], add_generation_prompt=True, tokenize=False
    )
    n_prompt = mask.index(True)
    assert smollm_tokenizer.decode(ids[:n_prompt]) == prompt_only


def test_raw_text_scores_every_token_but_first(smollm_tokenizer):
    ids, mask = render(Example("plain prose here", "general"), smollm_tokenizer)
    assert mask[0] is False and all(mask[1:])
    assert len(render(Example("word " * 100, "general"), smollm_tokenizer, max_len=10)[0]) == 10


def test_pack_blocks_shapes_and_content(smollm_tokenizer):
    exs = [Example(f"question {i}?", "general", f"answer number {i}.") for i in range(20)]
    ids, mask = pack_blocks(exs, smollm_tokenizer, block_len=32, max_example_len=64)
    stream = [t for e in exs for t in render(e, smollm_tokenizer)[0]]
    assert ids.shape == mask.shape and ids.shape[1] == 32
    assert ids.shape[0] == len(stream) // 32
    assert torch.equal(ids.flatten(), torch.tensor(stream[: ids.numel()]))
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks(exs[:1], smollm_tokenizer, block_len=4096, max_example_len=64)
