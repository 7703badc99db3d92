"""deltas: the one record of a stored layer delta against the store format, written out by hand."""

from __future__ import annotations

import pytest
import torch

from meswitch.deltas import DeltaFormatError, DenseDelta, QuantizedDelta, decode, decode_delta, unpack
from meswitch.deltas.apply import apply_delta
from tests.delta_helpers import IN, OUT, SCHEME_IDS, SCHEMES, encoded


def by_hand(fields: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    """The dense delta from the stored tensors, following the format's definition one column at a time."""
    out, n = meta["shape"]
    k, bits = meta["salient"], meta["bits"]
    idx = fields["salient_idx"].tolist() if k else []
    rest = [i for i in range(n) if i not in idx]
    codes = unpack(fields["codes"], bits, n - k).double()
    s = fields["scale"].double().expand(out)
    dense = torch.zeros(out, n, dtype=torch.float64)
    for j, col in enumerate(rest):
        c = codes[:, j]
        if meta["method"] == "sign2d":
            dense[:, col] = (2 * c - 1) * s * fields["col_scale"][j].double()
        elif "zero" in fields:
            dense[:, col] = c * s + fields["zero"].double()
        else:
            dense[:, col] = (c - ((1 << bits) - 1) / 2) * s
    for j, col in enumerate(idx):
        dense[:, col] = fields["salient_cols"][:, j].double()
    return dense


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_decoding_follows_the_format_and_writing_gives_the_same_tensors_back(scheme):
    fields, meta = encoded(scheme, seed=3)
    record = decode(fields, meta)
    assert isinstance(record, QuantizedDelta) and record.shape == (OUT, IN) and record.k == meta["salient"]
    torch.testing.assert_close(record.dequantize().double(), by_hand(fields, meta), rtol=1e-6, atol=1e-9)
    again = record.fields()
    assert again.keys() == fields.keys()
    for name, t in fields.items():  # bit for bit, dtype for dtype: stores written before load the same
        assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
    assert record.meta() == {key: meta[key] for key in ("method", "bits", "shape", "salient", "symmetric")}


def test_a_store_written_by_hand_decodes_to_its_levels():
    # 2 rows x 5 columns, rtn at 2 bits, asymmetric; column 3 salient. Codes of row 0: 0 1 2 3, row 1: 3 2 1 0,
    # packed little-endian 2 bits each: 0b11100100 = 228 and 0b00011011 = 27.
    fields = {"codes": torch.tensor([[228], [27]], dtype=torch.uint8),
              "scale": torch.tensor([0.5, 0.25], dtype=torch.float16),
              "zero": torch.tensor([-1.0, 0.0], dtype=torch.float16),
              "salient_idx": torch.tensor([3], dtype=torch.int16),
              "salient_cols": torch.tensor([[7.0], [-7.0]], dtype=torch.float16)}
    meta = {"method": "salient", "bits": 2, "shape": [2, 5], "salient": 1, "symmetric": False}
    want = torch.tensor([[-1.0, -0.5, 0.0, 7.0, 0.5], [0.75, 0.5, 0.25, -7.0, 0.0]])
    assert torch.equal(decode_delta(fields, meta), want)


def test_dense_deltas_keep_their_shape():
    d = torch.randn(3, 4).half()
    record = decode({"delta": d}, {"method": "dense", "bits": 16, "shape": [3, 4], "salient": 0})
    assert isinstance(record, DenseDelta) and torch.equal(record.dequantize(), d.float())
    assert torch.equal(record.fields()["delta"], d)


def test_bad_stored_tensors_are_refused_naming_what_is_wrong():
    fields, meta = encoded(("salient", 2, 4, True), seed=0)
    with pytest.raises(DeltaFormatError, match=r"lacks stored field\(s\) \['salient_cols'\]"):
        decode({k: v for k, v in fields.items() if k != "salient_cols"}, meta)
    with pytest.raises(DeltaFormatError, match="codes: packed rows of 76 codes at 2 bits must be 19 bytes"):
        decode({**fields, "codes": fields["codes"][:, 1:]}, meta)
    with pytest.raises(DeltaFormatError, match=r"salient_cols must be \[48, 4\], got \[48, 3\]"):
        decode({**fields, "salient_cols": fields["salient_cols"][:, :3]}, meta)
    with pytest.raises(DeltaFormatError, match="distinct columns"):
        decode({**fields, "salient_idx": torch.tensor([0, 0, 1, 2], dtype=torch.int16)}, meta)
    with pytest.raises(DeltaFormatError, match="unknown method 'zip'"):
        decode(fields, {**meta, "method": "zip"})
    with pytest.raises(DeltaFormatError, match="shape list"):
        decode(fields, {**meta, "shape": None})
    with pytest.raises(DeltaFormatError, match=r"meta says \[4\], the tensor is \[3\]"):
        decode({"delta": torch.zeros(3)}, {"method": "dense", "bits": 16, "shape": [4]})
    with pytest.raises(DeltaFormatError, match=r"scale must be \[out\]=\[48\]"):
        decode({**fields, "scale": fields["scale"][:5]}, meta)


def test_apply_delta_adds_the_decoded_delta_to_the_weight():
    layer = torch.nn.Linear(IN, OUT)
    w = layer.weight.detach().clone()
    fields, meta = encoded(("rtn", 3, 0, True), seed=5)
    model = torch.nn.Sequential()
    model.add_module("proj", layer)
    apply_delta(model, {"proj": fields}, {"proj": meta})
    torch.testing.assert_close(layer.weight.detach(), w + by_hand(fields, meta).float(), rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="'other.weight'"):
        apply_delta(model, {"other": fields}, {"other": meta})
