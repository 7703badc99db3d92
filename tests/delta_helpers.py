"""Builders for delta and backend tests: every stored scheme, random deltas, uneven expert batches."""

from __future__ import annotations

import torch

from meswitch.compress.codec import encode_delta

OUT, IN = 48, 80
# (method, bits, k, symmetric): every method, every bits, salient k = 0 and k > 0, asymmetric
SCHEMES = (
    [("salient", b, 0, True) for b in (1, 2, 3, 4)]
    + [("salient", b, 7, True) for b in (1, 2, 3, 4)]
    + [("salient", b, 5, False) for b in (1, 2, 3, 4)]
    + [("rtn", b, 0, True) for b in (1, 2, 3, 4)]
    + [("rtn", b, 0, False) for b in (1, 2, 3, 4)]
    + [("bitdelta", 1, 0, True)]
    + [("sign2d", 1, 0, True), ("sign2d", 1, 6, True)]
)
SCHEME_IDS = [f"{m}-{b}b-k{k}-{'sym' if s else 'asym'}" for m, b, k, s in SCHEMES]
# segment sizes per expert 0..3 (expert 0 resident but unused) plus base-only rows
BATCHES = {
    "uneven": [0, 1, 7, 3],
    "single-row": [0, 1, 0, 0],
    "one-expert": [0, 0, 5, 0],
    "empty": [0, 0, 0, 0],
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def encoded(scheme: tuple[str, int, int, bool], seed: int, out: int = OUT, n: int = IN):
    """Stored (fields, meta) of a random heavy-ish delta ``[out, n]``."""
    method, bits, k, sym = scheme
    g = gen(seed)
    delta = torch.randn(out, n, generator=g) * torch.exp(torch.randn(n, generator=g)) * 1e-2
    act_sq = torch.exp(torch.randn(n, generator=g))
    return encode_delta(delta, method, bits, k, act_sq, sym)


def interleaved_ids(sizes: list[int], base_rows: int, seed: int) -> list[int]:
    """Expert ``e`` repeated ``sizes[e]`` times plus ``base_rows`` of -1, shuffled."""
    ids = [e for e, n in enumerate(sizes) for _ in range(n)] + [-1] * base_rows
    perm = torch.randperm(len(ids), generator=gen(seed)).tolist()
    return [ids[p] for p in perm]


def rel_close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * max(scale, 1e-12))
