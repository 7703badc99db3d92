"""pack/unpack: exact round trip and byte-for-byte agreement with a slow bit-loop reference."""

from __future__ import annotations

import pytest
import torch

from meswitch.deltas.pack import pack, packed_cols, unpack

BITS = [1, 2, 3, 4]
NS = [1, 7, 8, 9, 577, 1536]


def ref_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Slow reference: code k of a row -> bits [k*bits, (k+1)*bits) of a little-endian bitstream."""
    rows = []
    for row in codes.tolist():
        stream = [0] * (len(row) * bits)
        for k, code in enumerate(row):
            for b in range(bits):
                stream[k * bits + b] = (code >> b) & 1
        nbytes = -(-len(stream) // 8)
        out = [0] * nbytes
        for i, bit in enumerate(stream):
            out[i // 8] |= bit << (i % 8)
        rows.append(out)
    return torch.tensor(rows, dtype=torch.uint8).reshape(codes.shape[0], -1)


def random_codes(out: int, n: int, bits: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (out, n), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", NS)
def test_round_trip_and_size(bits, n):
    codes = random_codes(3, n, bits, seed=n * 10 + bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, -(-n * bits // 8))  # ceil(n*bits/8) bytes per row, no more
    assert packed_cols(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 13, 40])
def test_matches_bit_loop_reference(bits, n):
    codes = random_codes(4, n, bits, seed=bits + 100 * n)
    assert torch.equal(pack(codes, bits), ref_pack(codes, bits))


def test_known_bytes():
    # 3 bits: codes 1..7,0 -> stream 100 010 110 001 101 011 111 000 (LSB first per code)
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * k) for k, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]
    assert pack(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.uint8), 1).tolist() == [[0b1101, 1]]
    assert pack(torch.tensor([[3, 0, 2]], dtype=torch.uint8), 2).tolist() == [[0b100011]]


def test_rows_are_independent():
    codes = random_codes(5, 9, 3, seed=1)
    packed = pack(codes, 3)
    for r in range(5):
        assert torch.equal(unpack(packed[r : r + 1], 3, 9), codes[r : r + 1])


def test_leading_dims_and_empty():
    codes = random_codes(6, 11, 2, seed=2).reshape(2, 3, 11)
    assert torch.equal(unpack(pack(codes, 2), 2, 11), codes)
    empty = torch.zeros(4, 0, dtype=torch.uint8)
    assert pack(empty, 3).shape == (4, 0)
    assert unpack(pack(empty, 3), 3, 0).shape == (4, 0)


@pytest.mark.parametrize("bits", [0, 5, 8, -1, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=repr(bits)):
        pack(torch.zeros(2, 8, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match=repr(bits)):
        unpack(torch.zeros(2, 1, dtype=torch.uint8), bits, 8)


def test_codes_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 4\).*got a code 4"):
        pack(torch.tensor([[0, 4]], dtype=torch.uint8), 2)


def test_wrong_dtype():
    with pytest.raises(TypeError, match="uint8"):
        pack(torch.zeros(2, 8, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(2, 2, dtype=torch.int32), 2, 8)


def test_unpack_width_mismatch():
    with pytest.raises(ValueError, match="must be 4 bytes wide, got 3"):
        unpack(torch.zeros(2, 3, dtype=torch.uint8), 3, 9)  # ceil(9*3/8) = 4
