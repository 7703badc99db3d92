"""Memory projections for real model sizes: shapes checked against the models' published totals."""

import pytest

from meswitch.eval.projection import (
    MODELS,
    GiB,
    base_bytes,
    expert_bytes,
    experts_that_fit,
    full_models_bytes,
    full_models_that_fit,
    store_bytes,
)

# Parameter counts the model cards publish (billions, rounded as they round them).
PUBLISHED = {"Llama-2-7B": 6.74, "Mistral-7B": 7.24, "Llama-2-13B": 13.02, "Llama-3-8B": 8.03}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_give_the_published_parameter_counts(name):
    assert MODELS[name].params / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01)


def test_mistral_linear_parameters_by_hand():
    # 32 blocks x (q 4096x4096 + o 4096x4096 + k,v 4096x1024 each + gate,up,down 4096x14336 each).
    per_block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
    assert MODELS["Mistral-7B"].linear_params == 32 * per_block


def test_expert_bytes_scale_with_bits_and_embedding_deltas():
    m = MODELS["Mistral-7B"]
    norms = 2 * (2 * 32 + 1) * 4096  # fp16 deltas of 2 norms per block and the final one
    assert expert_bytes(m, 2.0) == m.linear_params // 4 + norms
    assert expert_bytes(m, 4.0) - norms == 2 * (expert_bytes(m, 2.0) - norms)
    assert expert_bytes(m, 2.0, embedding_delta=True) == expert_bytes(m, 2.0) + 2 * 2 * 32000 * 4096
    assert expert_bytes(m, 2.0, int4_cache=True) == expert_bytes(m, 2.0) + m.linear_params // 2
    with pytest.raises(ValueError, match="positive"):
        expert_bytes(m, 0)


def test_store_and_capacity():
    m = MODELS["Llama-2-7B"]
    assert store_bytes(m, 0, 2.0) == base_bytes(m) == 2 * m.params
    assert full_models_bytes(m, 3) == 3 * base_bytes(m)
    n = experts_that_fit(m, 80 * GiB, 2.0)
    assert store_bytes(m, n, 2.0) <= 80 * GiB < store_bytes(m, n + 1, 2.0)
    assert experts_that_fit(m, base_bytes(m) - 1, 2.0) == 0
    # 16-bit experts: whole models, about 6 in 80 GB.
    assert full_models_that_fit(m, 80 * GiB) == 6


def test_replica_capacity_counts_the_int4_cache_not_embeddings():
    from meswitch.ray_app.capacity import max_experts_per_replica

    m = MODELS["Mistral-7B"]
    kv = 8 * GiB
    free = 80 * GiB - base_bytes(m) - kv
    packed = m.linear_params * 2.0 / 8 + 2 * m.norm_params  # 2-bit linear deltas + fp16 norm deltas
    assert max_experts_per_replica(m, 2.0, 80 * GiB, kv) == int(free // packed)
    assert max_experts_per_replica(m, 2.0, 80 * GiB, kv, int4_cache=True) == int(free // (packed + m.linear_params / 2))
