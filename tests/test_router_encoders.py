"""Router encoders against slow references; the base-model encoders end to end on the small zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from meswitch.router.encoders import LLMChoiceEncoder, MiniLMEncoder, domain_prefix, first_blocks, mean_pool
from tests.conftest import tiny_llama

TEXTS = ["What is 12 times 7?", "def f(x):\n    return x + 1", "Good morning! How are you today, my friend?"]


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(states, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_minilm_fp32_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from meswitch.router.encoders import minilm_path

    ref = SentenceTransformer(str(minilm_path()), device="cpu").encode(TEXTS, convert_to_tensor=True)
    ours = MiniLMEncoder(max_tokens=256, int8=False).encode(TEXTS)
    assert torch.allclose(ours, ref.cpu(), atol=1e-5)


def test_minilm_int8_stays_close_to_fp32_and_keeps_neighbours():
    probe = [*TEXTS, "Compute 13 multiplied by 6."]
    fp32 = MiniLMEncoder(int8=False).encode(probe)
    int8 = MiniLMEncoder(int8=True).encode(probe)
    assert torch.nn.functional.cosine_similarity(fp32, int8).min() > 0.9  # measured 0.93-0.96
    for emb in (fp32, int8):  # the arithmetic paraphrase is nearest the arithmetic question in both
        assert int((emb[:3] @ emb[3]).argmax()) == 0
    assert torch.allclose(int8.norm(dim=-1), torch.ones(len(probe)), atol=1e-5)


def test_minilm_extra_layers_are_the_pooled_states_of_those_blocks():
    from transformers import AutoModel, AutoTokenizer

    from meswitch.router.encoders import minilm_path

    plain = MiniLMEncoder(int8=False).encode(TEXTS)
    both = MiniLMEncoder(int8=False, layers=[2, 4]).encode(TEXTS)
    assert both.shape == (3, 3 * 384)
    assert torch.allclose(both[:, :384], plain, atol=1e-6)  # the sentence embedding comes first, unchanged
    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    for i, text in enumerate(TEXTS):  # one text at a time: no padding in the reference
        with torch.no_grad():
            hidden = model(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states
        for j, block in enumerate([2, 4]):
            want = torch.nn.functional.normalize(hidden[block][0].mean(0), dim=0)
            assert torch.allclose(both[i, 384 * (j + 1) : 384 * (j + 2)], want, atol=1e-5)


def test_minilm_refuses_a_block_it_does_not_have():
    from meswitch.router import RouterError

    with pytest.raises(RouterError, match="1..6"):
        MiniLMEncoder(layers=[7])


class _CharTokenizer:
    """Byte-level ids below 128 (the tiny model's vocabulary); pads with 0."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [1 + b % 127 for b in text.encode()]}


def test_llm_choice_scores_match_one_unpadded_text_at_a_time():
    model, tok = tiny_llama(layers=2), _CharTokenizer()
    domains = ["code", "general", "math"]
    enc = LLMChoiceEncoder(model, tok, domains, max_tokens=20)
    texts = ["What is 12 times 7?", "hi", "def f(x): return x + 1 if x else None  # longer than 20"]
    got = enc.encode(texts, batch_size=2)  # padded batches, sorted by length
    for i, text in enumerate(texts):
        t = tok(text)["input_ids"][:20]
        for c, d in enumerate(domains):
            p = tok(domain_prefix(d))["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0], -1)
            want = torch.stack([logp[len(p) + k - 1, t[k]] for k in range(len(t))]).mean()
            assert torch.allclose(got[i, c], want, atol=1e-4)


def test_an_llm_choice_router_of_the_letter_prompt_is_refused_not_misread():
    from meswitch.router import RouterError
    from meswitch.router.encoders import build_encoder, default_spec

    base, domains = (tiny_llama(layers=1), _CharTokenizer()), ["code", "general", "math"]
    assert isinstance(build_encoder(default_spec("llm-choice"), domains, base), LLMChoiceEncoder)
    old = {"kind": "llm-choice", "max_tokens": 128, "options": {}}  # what versions before channel scoring saved
    with pytest.raises(RouterError, match="retrain"):
        build_encoder(old, domains, base)


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_first_blocks_matches_the_full_models_hidden_states(layer):
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        full = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        want = model.model.norm(full[layer]) if layer < 3 else full[3]  # the last entry is already normed
        got = first_blocks(model, layer)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3  # the model is untouched


def test_first_blocks_refuses_a_layer_out_of_range():
    from meswitch.router import RouterError

    with pytest.raises(RouterError, match="1..2"):
        first_blocks(tiny_llama(layers=2), 3)


# ---- the base-model encoders on the small zoo ------------------------------------------------------------
@pytest.fixture(scope="module")
def small_store(small_zoo, tmp_path_factory):
    from meswitch.model.checkpoint import load_checkpoint
    from meswitch.store import DeltaStore, base_info, fingerprint_model

    base_dir = Path(small_zoo["paths"]["base"])
    model, tok = load_checkpoint(base_dir)
    store = DeltaStore.create(tmp_path_factory.mktemp("s") / "store", fingerprint_model(model), base_info(model))
    for name in ("code", "general", "math"):
        store.add_expert(name, {"model.layers.0.mlp.up_proj": {"q": torch.zeros(2, 2, dtype=torch.uint8)}},
                         {"model.layers.0.mlp.up_proj": {"method": "rtn"}}, {})
    store.set_extra("base_path", str(base_dir))
    return store, (model, tok)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["base-probe", "llm-choice"])
def test_base_model_encoders_train_save_and_load(small_store, small_zoo, kind):
    from meswitch.data.examples import read_jsonl
    from meswitch.router import load_router
    from meswitch.router.train import RouterTrainConfig, train_router

    store, base = small_store
    train = read_jsonl(Path(small_zoo["paths"]["train"]))
    router = train_router(store, train, RouterTrainConfig(encoder=kind, max_per_domain=16), base=base)
    router.save(store)
    again = load_router(store, kind)  # loads the base from the path the store records
    assert torch.allclose(again.probabilities(TEXTS), router.probabilities(TEXTS), atol=1e-5)
    assert [d.expert for d in again.route(["", "   "])] == ["general", "general"]
    assert len(again.route(["word " * 200_000])) == 1
    if kind == "llm-choice":
        scores = router.encoder.encode(TEXTS)
        assert scores.shape == (3, 3) and (scores <= 0).all()  # mean log-probabilities of the text's tokens
    else:
        assert router.encoder.layer == 2  # 2/3 of the small zoo's 4 blocks, rounded down
