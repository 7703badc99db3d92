"""engine: the per-step fast paths against their plain statements (batched sampling, rotary tables, decode
attention over a per-step plan)."""

from __future__ import annotations

import pytest
import torch

from meswitch.engine.attention import (
    AttentionSpec,
    apply_rope,
    apply_rope_tables,
    attention,
    head_view,
    rope_,
    rope_tables,
)
from meswitch.engine.kv_cache import KVCache
from meswitch.engine.layers import rms_normalize
from meswitch.engine.model import SeqSlice, StepBatch
from meswitch.engine.sampling import SamplingParams, sample, top_p_filter, top_p_filter_rows
from tests.delta_helpers import gen

PARAMS = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
          SamplingParams(temperature=1.3, top_p=0.9, seed=2), SamplingParams(temperature=0),
          SamplingParams(temperature=0.5, top_p=0.3, seed=3), SamplingParams(temperature=1.0, top_p=1e-9, seed=4)]


def _generators(params: list[SamplingParams]) -> list[torch.Generator | None]:
    return [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]


def test_top_p_filter_rows_equals_the_filter_row_by_row():
    logits = torch.randn(4, 1000, generator=gen(0)) * 3
    top_p = torch.tensor([0.9, 0.5, 0.99, 1e-6])
    want = torch.stack([top_p_filter(logits[i], float(top_p[i])) for i in range(4)])
    assert torch.equal(top_p_filter_rows(logits, top_p), want)


def test_batched_sampling_draws_what_each_row_draws_alone():
    logits = torch.randn(len(PARAMS), 500, generator=gen(1)) * 2
    for _ in range(3):  # the generators advance alike, step after step
        gens_batch, gens_alone = _generators(PARAMS), _generators(PARAMS)
        batched = sample(logits, PARAMS, gens_batch)
        alone = [int(sample(logits[i : i + 1], [p], [g])[0]) for i, (p, g) in enumerate(zip(PARAMS, gens_alone, strict=True))]
        assert batched.tolist() == alone
        assert batched[0] == logits[0].argmax() and batched[3] == logits[3].argmax()
        assert batched[5] == logits[5].argmax()  # a vanishing top_p keeps the most likely token only


def test_rope_tables_give_apply_rope_bit_for_bit():
    for hd, r in ((16, 16), (16, 8)):  # full and partial rotary
        x = torch.randn(5, 3, hd, generator=gen(2))
        cos, sin = torch.randn(5, r, generator=gen(3)), torch.randn(5, r, generator=gen(4))
        assert torch.equal(apply_rope_tables(x, *rope_tables(cos, sin)), apply_rope(x, cos, sin))


def test_rope_in_place_on_a_head_view_gives_the_tables_bit_for_bit():
    for hd, r in ((16, 16), (16, 8)):  # full and partial rotary
        y = torch.randn(5, 7 * hd, generator=gen(5))  # a fused output: 3 q heads, 2 k heads, 2 v heads
        qkv = y.view(5, 7, hd)
        cos, sin = torch.randn(5, r, generator=gen(6)), torch.randn(5, r, generator=gen(7))
        tables = rope_tables(cos, sin)
        want = apply_rope_tables(qkv[:, :5], *tables)
        v = qkv[:, 5:].clone()
        halves = head_view(qkv, 0, (5, 2, r // 2), (hd, r // 2, 1))  # the q and k heads' first r dims
        assert torch.equal(halves.flatten(-2), qkv[:, :5, :r])
        rope_(halves, *(t.unflatten(-1, (2, r // 2)) for t in tables))
        assert torch.equal(qkv[:, :5], want) and torch.equal(qkv[:, 5:], v)  # in place; v untouched


def test_head_view_is_the_slice_and_view():
    y = torch.randn(4, 10, 6, generator=gen(11))
    assert torch.equal(head_view(y, 3 * 6, (2, 2, 6), (12, 6, 1)), y[:, 3:7].view(4, 2, 2, 6))
    assert torch.equal(head_view(y[1:], 6, (3, 6), (6, 1)), y[1:, 1:4])


@pytest.mark.parametrize("shape", [(1, 576), (16, 576), (3, 4, 64)])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_normalize_is_torch_rms_norm_bit_for_bit(shape, eps):
    x = torch.randn(*shape, generator=gen(8)) * 3
    w = torch.randn(shape[-1], generator=gen(9))
    width, e = torch.tensor(float(shape[-1])), torch.tensor(eps)
    assert torch.equal(rms_normalize(x, width, e), torch.rms_norm(x, (shape[-1],), None, eps))
    assert torch.equal(rms_normalize(x, width, e) * w, torch.rms_norm(x, (shape[-1],), w, eps))


def test_kv_cache_writes_keys_and_values_in_one_copy_as_two():
    one, two = KVCache(2, 4, 2, 8, 64, initial=16), KVCache(2, 4, 2, 8, 64, initial=16)
    slots, pos = torch.tensor([3, 0, 2]), torch.tensor([5, 1, 9])
    kv = torch.randn(3, 2, 2, 8, generator=gen(10))
    one.write_rows(1, one.token_rows(slots.tolist(), pos.tolist()), kv)
    two.write_tokens(1, slots, pos, kv[:, 0], kv[:, 1])
    assert all(torch.equal(a, b) for a, b in zip(one.k + one.v, two.k + two.v, strict=True))
    one.reserve(40)  # grown: k, v and rows are still views of kv
    assert one.k[1].data_ptr() == one.kv[1].data_ptr() == one.rows[1].data_ptr()
    assert torch.equal(one.v[1][:, :, :16], two.v[1])
    one.write_rows(0, one.token_rows([1], [33]), kv[:1])
    assert torch.equal(one.k[0][1, :, 33], kv[0, 0]) and torch.equal(one.v[0][1, :, 33], kv[0, 1])


def _plain_attention(q, k_all, v_all, qpos, spec):
    """One sequence in plain PyTorch: ``q: [n, H, hd]`` at positions ``qpos``, keys ``[C, H_kv, hd]``."""
    g = q.shape[1] // k_all.shape[1]
    k, v = k_all.repeat_interleave(g, 1), v_all.repeat_interleave(g, 1)  # [C, H, hd]
    s = torch.einsum("nhd,chd->hnc", q, k) * spec.scale
    if spec.softcap is not None:
        s = torch.tanh(s / spec.softcap) * spec.softcap
    kpos = torch.arange(k.shape[0])
    dist = qpos[:, None] - kpos
    visible = (dist >= 0) & (dist < spec.window if spec.window is not None else True)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), -1)
    return torch.einsum("hnc,chd->nhd", p, v)


@pytest.mark.parametrize("spec", [AttentionSpec(0.25), AttentionSpec(0.25, softcap=5.0), AttentionSpec(0.25, window=3)])
def test_decode_and_prefill_rows_in_one_step_match_each_sequence_alone(spec):
    """Slots out of order with a free one between them, a prefill among decodes, windowed and soft-capped."""
    heads, kvh, hd = 4, 2, 8
    cache = KVCache(1, 6, kvh, hd, 32)
    past = {0: 5, 4: 2, 2: 7}  # slot -> cached positions (slot 1 and 3 free, slot 5 prefills)
    hist = {}
    for slot, n in past.items():
        k, v = torch.randn(n, kvh, hd, generator=gen(slot)), torch.randn(n, kvh, hd, generator=gen(10 + slot))
        cache.write(0, slot, 0, k, v)
        hist[slot] = (k, v)
    seqs = [SeqSlice(4, 2, 1, 0), SeqSlice(5, 0, 3, 1), SeqSlice(0, 5, 1, 1), SeqSlice(2, 7, 1, 2)]
    t = sum(s.n for s in seqs)
    q = torch.randn(t, heads, hd, generator=gen(20))
    k, v = torch.randn(t, kvh, hd, generator=gen(21)), torch.randn(t, kvh, hd, generator=gen(22))
    out = attention(q, k, v, StepBatch.build(seqs), cache, 0, spec).view(t, heads, hd)
    row = 0
    for s in seqs:
        old_k, old_v = hist.get(s.slot, (k[:0], v[:0]))
        ks, vs = torch.cat([old_k, k[row : row + s.n]]), torch.cat([old_v, v[row : row + s.n]])
        want = _plain_attention(q[row : row + s.n], ks, vs, torch.arange(s.start, s.start + s.n), spec)
        torch.testing.assert_close(out[row : row + s.n], want, rtol=1e-5, atol=1e-5)
        row += s.n


def test_a_decode_only_step_plans_once_and_returns_every_row():
    seqs = [SeqSlice(3, 4, 1, 0), SeqSlice(0, 2, 1, -1)]
    batch = StepBatch.build(seqs)
    plan = batch.decode
    assert plan is batch.decode and plan.all_rows  # built once per step, read by every layer
    assert plan.slots.tolist() == [3, 0] and plan.n_slots == 4 and plan.length == 5
    assert plan.gather.tolist() == [1, 0, 0, 0]
    bias = plan.bias(None, torch.float32)
    assert bias.shape == (4, 1, 1, 5) and torch.isfinite(bias[1]).all()  # a free slot is never all-masked
    assert batch.last_segments() is batch.segments


@pytest.mark.parametrize("spec", [AttentionSpec(0.25), AttentionSpec(0.25, softcap=5.0), AttentionSpec(0.25, window=3),
                                  AttentionSpec(0.25, window=8)])
def test_decode_in_slot_order_at_one_length_needs_no_gather_nor_mask(spec):
    heads, kvh, hd, past = 4, 2, 8, 5
    cache = KVCache(1, 3, kvh, hd, 32)
    hist = [(torch.randn(past, kvh, hd, generator=gen(30 + i)), torch.randn(past, kvh, hd, generator=gen(40 + i)))
            for i in range(3)]
    for slot, (k, v) in enumerate(hist):
        cache.write(0, slot, 0, k, v)
    batch = StepBatch.build([SeqSlice(slot, past, 1, -1) for slot in range(3)])
    plan = batch.decode
    assert plan.in_slot_order and plan.same_length
    assert (plan.bias(spec.window, torch.float32) is None) == (spec.window is None or spec.window >= past + 1)
    q = torch.randn(3, heads, hd, generator=gen(50))
    k, v = torch.randn(3, kvh, hd, generator=gen(51)), torch.randn(3, kvh, hd, generator=gen(52))
    out = attention(q, k, v, batch, cache, 0, spec).view(3, heads, hd)
    for slot, (ok, ov) in enumerate(hist):
        ks, vs = torch.cat([ok, k[slot : slot + 1]]), torch.cat([ov, v[slot : slot + 1]])
        want = _plain_attention(q[slot : slot + 1], ks, vs, torch.tensor([past]), spec)
        torch.testing.assert_close(out[slot : slot + 1], want, rtol=1e-5, atol=1e-5)
