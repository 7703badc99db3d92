"""salient: channel error, selection, mixed-precision reconstruction and the bit budget."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from meswitch.compress.quant import qparams, rtn
from meswitch.compress.salient import (
    budget_k,
    channel_error,
    effective_bits,
    salient_quantize,
    select_salient,
)

SCHEMES = [(b, s) for b in (1, 2, 3, 4) for s in (True, False)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def heavy_tailed(out: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A delta with Student-t entries and log-normal column scales, and log-normal act_sq."""
    g = gen(seed)
    col = torch.exp(torch.randn(n, generator=g))
    t = torch.randn(out, n, generator=g) / torch.sqrt(torch.distributions.Chi2(3.0).sample((out, n)) / 3)
    act_sq = torch.exp(1.5 * torch.randn(n, generator=g))
    return t * col * 1e-3, act_sq


def test_channel_error_matches_loop():
    g = gen(0)
    delta, deq, act_sq = (
        torch.randn(4, 6, generator=g),
        torch.randn(4, 6, generator=g),
        torch.rand(6, generator=g),
    )
    ref = [
        act_sq[i].item() * sum((delta[j, i].item() - deq[j, i].item()) ** 2 for j in range(4))
        for i in range(6)
    ]
    torch.testing.assert_close(channel_error(delta, deq, act_sq), torch.tensor(ref))


def test_select_salient_finds_outlier_column_at_one_bit():
    # At 1 bit the level is mean|row|, far from a 100x entry; at 2-4 bits (and asymmetric 1 bit)
    # the outlier is its row's grid end point and is reproduced almost exactly (see salient.py).
    delta = torch.randn(32, 16, generator=gen(1))
    delta[:, 5] *= 100
    assert select_salient(delta, torch.ones(16), 1, 1, symmetric=True).tolist() == [5]


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_activation_weighting_breaks_equal_errors(bits, symmetric):
    delta = torch.randn(16, 12, generator=gen(bits))
    delta[:, 9] = delta[:, 2]  # identical columns -> identical quantization errors
    err = channel_error(delta, rtn(delta, bits, symmetric).dequantize(), torch.ones(12))
    assert err[2] == err[9] and err[2] > 0
    for heavy in (2, 9):
        act_sq = torch.ones(12)
        act_sq[heavy] = 1e4
        assert select_salient(delta, act_sq, bits, 1, symmetric).tolist() == [heavy]


def test_select_salient_is_sorted_top_k():
    delta = torch.randn(8, 20, generator=gen(2))
    act_sq = torch.rand(20, generator=gen(3))
    idx = select_salient(delta, act_sq, 2, 5)
    err = channel_error(delta, rtn(delta, 2).dequantize(), act_sq)
    ref = sorted(sorted(range(20), key=lambda i: -err[i].item())[:5])
    assert idx.dtype == torch.int64 and idx.tolist() == ref


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_salient_columns_exact_and_grid_from_rest(bits, symmetric):
    delta, act_sq = heavy_tailed(16, 40, seed=4)
    sd = salient_quantize(delta, act_sq, bits, 6, symmetric)
    idx = sd.salient_idx.tolist()
    rest = [i for i in range(40) if i not in idx]
    assert idx == sorted(idx) and len(idx) == 6 and sd.rest_idx.tolist() == rest
    assert sd.salient_cols.dtype == torch.float16 and sd.codes.shape == (16, 34)
    deq = sd.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (16, 40)
    assert torch.equal(deq[:, idx], delta[:, idx].half().float())
    q_rest = rtn(delta[:, rest], bits, symmetric)  # grid and codes of the remaining columns alone
    assert torch.equal(sd.codes, q_rest.codes) and torch.equal(sd.scale, q_rest.scale)
    assert torch.equal(deq[:, rest], q_rest.dequantize())
    if bits > 1 or not symmetric:  # absmax/min-max grid: removing columns can only tighten it
        assert bool((sd.scale <= qparams(delta, bits, symmetric).scale).all())


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_k0_is_rtn_and_k_in_is_fp16(bits, symmetric):
    delta, act_sq = heavy_tailed(8, 24, seed=5)
    sd, q = salient_quantize(delta, act_sq, bits, 0, symmetric), rtn(delta, bits, symmetric)
    assert sd.salient_idx.numel() == 0 and sd.salient_cols.shape == (8, 0)
    assert torch.equal(sd.codes, q.codes) and torch.equal(sd.scale, q.scale)
    assert (sd.zero is None) if symmetric else torch.equal(sd.zero, q.zero)
    assert torch.equal(sd.dequantize(), q.dequantize())
    full = salient_quantize(delta, act_sq, bits, 24, symmetric)
    assert full.codes.shape == (8, 0)
    assert torch.equal(full.dequantize(), delta.half().float())


@pytest.mark.parametrize(("bits", "symmetric"), SCHEMES)
def test_output_error_falls_as_k_grows(bits, symmetric):
    delta, act_sq = heavy_tailed(64, 128, seed=6)
    x = torch.randn(256, 128, generator=gen(7)) * act_sq.sqrt()  # E[x_i^2] = act_sq_i
    errs = [
        float((x @ (delta - salient_quantize(delta, act_sq, bits, k, symmetric).dequantize()).T).norm())
        for k in (0, 8, 32)
    ]
    assert errs[0] > errs[1] > errs[2], errs


def test_gradient_reaches_scale_through_salient_delta():
    delta, act_sq = heavy_tailed(4, 10, seed=8)
    sd = salient_quantize(delta, act_sq, 2, 3)
    scale = sd.scale.clone().requires_grad_()
    dataclasses.replace(sd, scale=scale).dequantize().sum().backward()
    expected = (sd.codes.float() - 1.5).sum(1)  # only the 7 quantized columns depend on scale
    torch.testing.assert_close(scale.grad, expected)


def test_effective_bits_by_hand():
    # out=576, in=576, bits=2, k=8, symmetric:
    #   codes: 568 columns * 2 bits = 1136 bits = 142 bytes per row (no padding), 576 rows
    #   scale: 16 bits per row; salient: 8 columns * 16 bits per row; indices: 8 * 16 bits
    total = 576 * 142 * 8 + 576 * 16 + 576 * 8 * 16 + 8 * 16  # = 737408 bits
    expected = total / (576 * 576)  # ~2.2226
    got = effective_bits(out_features=576, in_features=576, k=8, bits=2, symmetric=True)
    assert got == pytest.approx(expected, rel=1e-12) and got == pytest.approx(2.22261, abs=1e-5)
    # asymmetric adds a 16-bit zero per row; 3 bits of 9 columns pad each row to 4 bytes
    assert (
        effective_bits(out_features=2, in_features=9, k=0, bits=3, symmetric=False) == (2 * 32 + 2 * 32) / 18
    )


@pytest.mark.parametrize(
    ("out", "n", "bits", "symmetric"), [(64, 96, 2, True), (5, 33, 3, False), (576, 576, 1, True)]
)
@pytest.mark.parametrize("target", [1.0, 2.2, 2.5, 3.1, 4.0, 8.0, 17.0])
def test_budget_k(out, n, bits, symmetric, target):
    def cost(k: int) -> float:
        return effective_bits(out_features=out, in_features=n, k=k, bits=bits, symmetric=symmetric)

    k = budget_k(out_features=out, in_features=n, bits=bits, target_bits=target, symmetric=symmetric)
    fits = [j for j in range(n + 1) if cost(j) <= target]  # brute-force reference
    assert k == (max(fits) if fits else 0)
    if fits:
        assert cost(k) <= target
    if k < n:
        assert cost(k + 1) > target


def test_effective_bits_counts_the_stored_tensors_of_a_salient_delta():
    delta, act_sq = heavy_tailed(8, 24, seed=9)
    sd = salient_quantize(delta, act_sq, 3, 4, symmetric=False)
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in sd.fields().values())
    assert stored_bits / (8 * 24) == effective_bits(out_features=8, in_features=24, k=4, bits=3, symmetric=False)


def test_bad_inputs():
    delta = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"act_sq must be \[in\]=\[6\], got shape \(5,\)"):
        select_salient(delta, torch.ones(5), 2, 1)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, in=6\], got 7"):
        salient_quantize(delta, torch.ones(6), 2, 7)
    with pytest.raises(ValueError, match=r"2-D \[out, in\], got shape \(4, 6, 1\)"):
        salient_quantize(delta[..., None], torch.ones(6), 2, 1)
    with pytest.raises(ValueError, match="bits must be one of"):
        salient_quantize(delta, torch.ones(6), 8, 1)
    with pytest.raises(ValueError, match=r"deq must match delta \(4, 6\)"):
        channel_error(delta, delta[:, :5], torch.ones(6))
    with pytest.raises(ValueError, match="k must be"):
        effective_bits(out_features=4, in_features=6, k=9, bits=2, symmetric=True)
    sd = salient_quantize(delta, torch.ones(6), 2, 2)
    with pytest.raises(ValueError, match=r"salient_cols must be \[4, 2\], got \[4, 3\]"):
        dataclasses.replace(sd, salient_cols=torch.zeros(4, 3))
