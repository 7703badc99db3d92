"""quant: codes and grids against a slow Python-loop reference, error bounds, gradients."""

from __future__ import annotations

import struct

import pytest
import torch

from meswitch.compress.quant import SCALE_FLOOR, bitdelta, qparams, quantize, rtn
from meswitch.deltas import QuantizedDelta, dequantize

BITS = [1, 2, 3, 4]


def f16(x: float, up: bool) -> float:
    """Slow reference: the nearest float16 at or above (up) / at or below x, via its bit pattern."""
    h = struct.unpack("<e", struct.pack("<e", x))[0]
    if (h < x) if up else (h > x):
        u = struct.unpack("<H", struct.pack("<e", h))[0]
        if h == 0:  # +-0 -> smallest subnormal of the needed sign
            u = 0x0001 if up else 0x8001
        elif (h > 0) == up:  # moving away from zero
            u += 1
        else:
            u -= 1
        h = struct.unpack("<e", struct.pack("<H", u))[0]
    return h


def ref_quant(delta: torch.Tensor, bits: int, symmetric: bool):
    """Slow reference: per row, build the list of levels and pick the nearest (ties -> larger level)."""
    L = 2**bits
    codes, deq, scales, zeros = [], [], [], []
    for row in delta.double().tolist():
        if symmetric:
            mag = sum(abs(v) for v in row) / len(row) if bits == 1 else max(abs(v) for v in row)
            s = f16(max(2 * mag / (L - 1), SCALE_FLOOR), up=True)
            z = None
            levels = [(c - (L - 1) / 2) * s for c in range(L)]
        else:
            z = f16(min(row), up=False)
            s = f16(max((max(row) - z) / (L - 1), SCALE_FLOOR), up=True)
            levels = [z + c * s for c in range(L)]
        crow = []
        for v in row:
            best = 0
            for c in range(L):
                if abs(v - levels[c]) <= abs(v - levels[best]):
                    best = c
            crow.append(best)
        codes.append(crow)
        deq.append([levels[c] for c in crow])
        scales.append(s)
        zeros.append(z)
    return codes, deq, scales, zeros


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_matches_loop_reference(bits, symmetric):
    g = torch.Generator().manual_seed(bits + 10 * symmetric)
    delta = torch.randn(5, 7, generator=g) * 1e-2
    delta[2] += 3e-2  # one all-positive-ish row, so the asymmetric grid does not contain 0
    codes, deq, scales, zeros = ref_quant(delta, bits, symmetric)
    q = rtn(delta, bits, symmetric)
    assert q.codes.dtype == torch.uint8
    assert q.codes.tolist() == codes
    assert q.scale.tolist() == scales
    assert (q.zero is None) if symmetric else q.zero.tolist() == zeros
    torch.testing.assert_close(q.dequantize(), torch.tensor(deq, dtype=torch.float32))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_grid_is_float16_and_chain_matches_rtn(bits, symmetric):
    delta = torch.randn(16, 33, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    scale, zero = qparams(delta, bits, symmetric)
    assert scale.dtype == torch.float32 and scale.shape == (16,)
    assert torch.equal(scale.half().float(), scale)
    if zero is not None:
        assert torch.equal(zero.half().float(), zero)
    codes = quantize(delta, scale, zero, bits)
    assert int(codes.max()) < 2**bits
    q = rtn(delta, bits, symmetric)
    assert torch.equal(codes, q.codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_round_trip_error_within_half_step(bits, symmetric):
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(bits)) * 1e-3
    q = rtn(delta, bits, symmetric)
    err = (q.dequantize() - delta).abs()
    assert bool((err <= q.scale[:, None] / 2 * (1 + 1e-5)).all())
    if symmetric:  # the outermost level is the absmax, up to float16 rounding of the scale
        top = (2**bits - 1) / 2 * q.scale
        assert bool((top >= delta.abs().amax(1)).all())
        assert bool((top <= delta.abs().amax(1) * (1 + 2**-10)).all())


def test_clip_ratio_shrinks_the_grid():
    delta = torch.randn(8, 40, generator=torch.Generator().manual_seed(5))
    full = rtn(delta, 3).scale
    half = rtn(delta, 3, clip_ratio=0.5).scale
    torch.testing.assert_close(half, full / 2, rtol=2e-3, atol=0)
    with pytest.raises(ValueError, match="clip_ratio"):
        qparams(delta, 3, clip_ratio=0.0)


def test_one_bit_symmetric_is_sign_times_row_mean():
    delta = torch.randn(6, 50, generator=torch.Generator().manual_seed(6))
    delta[0, 0] = 0.0
    q = rtn(delta, 1, symmetric=True)
    sign = torch.where(delta >= 0, 1.0, -1.0)  # sign(0) := +1
    assert torch.equal(q.codes, (delta >= 0).to(torch.uint8))
    assert torch.equal(q.dequantize(), sign * (q.scale / 2)[:, None])
    torch.testing.assert_close(q.scale / 2, delta.abs().mean(1), rtol=2**-10, atol=0)


def test_bitdelta_one_scale_per_matrix():
    delta = torch.randn(6, 50, generator=torch.Generator().manual_seed(7)) * 1e-3
    codes, scale = bitdelta(delta)
    assert codes.dtype == torch.uint8 and codes.shape == (6, 50) and scale.shape == (1,)
    assert scale.item() == f16(2 * delta.double().abs().mean().item(), up=True)  # 2 * BitDelta's alpha
    assert torch.equal(codes, (delta >= 0).to(torch.uint8))
    sign = torch.where(delta >= 0, 1.0, -1.0)
    assert torch.equal(dequantize(codes, scale, None, 1), sign * scale / 2)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_zero_rows_are_finite(bits, symmetric):
    delta = torch.zeros(3, 9)
    delta[1] = torch.linspace(-1e-3, 1e-3, 9)
    q = rtn(delta, bits, symmetric)
    deq = q.dequantize()
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
    assert bool(torch.isfinite(deq).all())
    assert float(deq[0].abs().max()) <= SCALE_FLOOR  # at most half a floor step away from 0
    codes, scale = bitdelta(torch.zeros(2, 4))
    assert bool(torch.isfinite(dequantize(codes, scale, None, 1)).all())


@pytest.mark.parametrize("symmetric", [True, False])
def test_gradcheck_dequantize(symmetric):
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 8, (3, 4), generator=g, dtype=torch.uint8)
    scale = (torch.rand(3, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    if symmetric:
        assert torch.autograd.gradcheck(lambda s: dequantize(codes, s, None, 3), (scale,))
    else:
        zero = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda s, z: dequantize(codes, s, z, 3), (scale, zero))


def test_gradient_reaches_scale_through_quantized_delta():
    delta = torch.randn(4, 10, generator=torch.Generator().manual_seed(9))
    q = rtn(delta, 2)
    scale = q.scale.clone().requires_grad_()
    out = QuantizedDelta(q.codes, scale, None, 2).dequantize()
    out.sum().backward()
    expected = (q.codes.float() - 1.5).sum(1)  # d level / d scale = c - (L-1)/2
    torch.testing.assert_close(scale.grad, expected)


def test_bad_inputs():
    delta = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"2-D \[out, in\], got shape \(24,\)"):
        rtn(delta.flatten(), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        rtn(delta, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        rtn(torch.full((2, 2), float("nan")), 2)
    with pytest.raises(ValueError, match=r"scale must be \[out\]=\[4\].*got shape \(3,\)"):
        quantize(delta, torch.ones(3), None, 2)
    with pytest.raises(ValueError, match=r"zero must match scale \(4,\), got shape \(2,\)"):
        dequantize(torch.zeros(4, 6, dtype=torch.uint8), torch.ones(4), torch.ones(2), 2)
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(4, 6), torch.ones(4), None, 2)
