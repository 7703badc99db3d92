"""Records of one stored layer delta, and the one decoder of a store's layer tensors.

A layer delta is ``delta = W_expert - W_base`` of one weight. It is stored in one of three forms:

- :class:`QuantizedDelta` (``meta["method"]`` ``salient``, ``rtn``, ``sign2d`` or ``bitdelta``):
  ``k`` salient input columns kept in 16 bit, the other ``in - k`` columns as ``bits``-bit codes on
  a grid per output row (:mod:`meswitch.deltas.grid`). Stored tensors (``fields()``):

  ========================  =====================================================  ==================
  field                     dtype, shape                                           present
  ========================  =====================================================  ==================
  ``codes``                 uint8 ``[out, packed_cols(in - k, bits)]`` (``pack``)  always
  ``scale``                 fp16 ``[out]`` (``[1]``: bitdelta)                     always
  ``zero``                  fp16 ``[out]``                                         asymmetric grid
  ``col_scale``             fp16 ``[in - k]``                                      sign2d
  ``salient_idx``           int16 ``[k]`` (int32 when ``in > 32767``)              ``k > 0``
  ``salient_cols``          fp16 ``[out, k]``                                      ``k > 0``
  ========================  =====================================================  ==================

- :class:`DenseDelta` (``method`` ``dense``): ``delta`` fp16 of the weight's shape (norms,
  embeddings, and linear layers stored losslessly).

- :class:`LowRankDelta` (``method`` ``lora``): a LoRA adapter's factors, ``delta = scale * lora_b @ lora_a``,
  kept as given (16 bit):

  ========================  =====================================================  ==================
  field                     dtype, shape                                           present
  ========================  =====================================================  ==================
  ``lora_a``                fp16 or bf16 ``[r, in]``                               always
  ``lora_b``                fp16 or bf16 ``[out, r]``                              always
  ========================  =====================================================  ==================

Layer meta (JSON in the manifest): ``method``, ``bits``, ``shape``, ``salient`` (``k``),
``symmetric`` (quantized forms), ``rank`` and ``scale`` (``lora``); the encoder may add keys of its
own (``gptq``), which readers ignore.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from meswitch.deltas.grid import check_grid, dequantize, sign2d_dequantize
from meswitch.deltas.pack import check_bits, check_packed, pack, unpack
from meswitch.errors import MeswitchError

METHODS = ("salient", "rtn", "sign2d", "bitdelta")  # quantized forms; "dense" and "lora" are the others
LOW_RANK = "lora"
HALF_DTYPES = (torch.float16, torch.bfloat16)  # what LowRankDelta stores its factors as


def is_positive_int(value: object) -> bool:
    """Whether ``value`` (read from JSON) is an int > 0, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_finite_number(value: object) -> bool:
    """Whether ``value`` (read from JSON) is a finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DeltaFormatError(MeswitchError, ValueError):
    """Stored tensors or layer meta do not describe a delta of the form they claim."""


def _no_columns() -> Tensor:
    return torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True, eq=False)
class QuantizedDelta:
    """A delta ``[out, in]`` as codes on a per-row grid plus ``k`` exact salient input columns.

    ``codes: uint8 [out, in - k]`` (unpacked; the quantized columns in ascending order),
    ``scale: [out]`` (``[1]``: one grid for the matrix), ``zero: [out] | None`` (None: symmetric),
    ``salient_idx: int64 [k]`` (ascending), ``salient_cols: [out, k]`` (16-bit values of the delta),
    ``col_scale: [in - k] | None`` (sign2d: ``level = (2c - 1) * scale[o] * col_scale[i]``).
    ``salient_cols`` may be None when ``k = 0``; :meth:`columns` gives ``[out, k]`` either way.
    ``scale``, ``zero`` and ``col_scale`` may require grad: :meth:`dequantize` is differentiable in them.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    bits: int
    salient_idx: Tensor = field(default_factory=_no_columns)
    salient_cols: Tensor | None = None
    col_scale: Tensor | None = None
    method: str = "rtn"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.method not in METHODS:
            raise DeltaFormatError(f"method must be one of {METHODS}, got {self.method!r}")
        out, rest = self._code_shape()
        if self.salient_idx.dim() != 1 or self.salient_idx.dtype != torch.int64:
            raise DeltaFormatError(
                f"salient_idx must be int64 [k], got {self.salient_idx.dtype} {list(self.salient_idx.shape)}")
        k = self.salient_idx.shape[0]
        if self.salient_cols is None and k:
            raise DeltaFormatError(f"{k} salient columns named but no salient_cols given")
        try:
            check_grid(self.scale, self.zero, out)
        except ValueError as exc:
            raise DeltaFormatError(f"{self.method} delta {list(self.shape)}: {exc}") from exc
        expect = {"salient_cols": (out, k)} if self.salient_cols is not None else {}
        if self.col_scale is not None:
            expect["col_scale"] = (rest,)
        for name, want in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise DeltaFormatError(f"{self.method} delta {list(self.shape)}: {name} must be {list(want)}, "
                                       f"got {list(got)}")

    def _code_shape(self) -> tuple[int, int]:
        """``(out, in - k)`` of the codes, checked to be uint8 ``[out, in - k]``."""
        if self.codes.dtype != torch.uint8 or self.codes.dim() != 2:
            raise DeltaFormatError(f"codes must be uint8 [out, in - k], got {self.codes.dtype} {list(self.codes.shape)}")
        return self.codes.shape[0], self.codes.shape[1]

    @property
    def _device(self) -> torch.device:
        return self.codes.device

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the whole delta."""
        out, rest = self._code_shape()
        return (out, rest + self.salient_idx.shape[0])

    def columns(self) -> Tensor:
        """``salient_cols``, or an empty ``[out, 0]`` when there are none."""
        if self.salient_cols is not None:
            return self.salient_cols
        return torch.zeros(self.shape[0], 0, dtype=torch.float16, device=self._device)

    @property
    def k(self) -> int:
        """Number of salient (16-bit) input columns."""
        return self.salient_idx.shape[0]

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def rest_idx(self) -> Tensor:
        """``int64 [in - k]``: the quantized columns, ascending (the columns of ``codes``)."""
        keep = torch.ones(self.shape[1], dtype=torch.bool, device=self._device)
        keep[self.salient_idx] = False
        return keep.nonzero().squeeze(1)

    def dequantize_codes(self) -> Tensor:
        """Levels of the quantized columns: ``[out, in - k]`` (float32, or float64 for float64 grids)."""
        if self.col_scale is not None:
            return sign2d_dequantize(self.codes, self.scale, self.col_scale)
        return dequantize(self.codes, self.scale, self.zero, self.bits)

    def dequantize(self) -> Tensor:
        """The dense delta ``[out, in]`` (float32 for float16/32 grids); differentiable in the grid."""
        rest = self.dequantize_codes()
        if not self.k:
            return rest
        full = rest.new_zeros(self.shape).index_copy(1, self.rest_idx, rest)
        return full.index_copy(1, self.salient_idx, self.salient_cols.to(rest.dtype))

    def fields(self) -> dict[str, Tensor]:
        """The tensors a store keeps (module docstring): codes packed, 16-bit grid and columns."""
        out: dict[str, Tensor] = {"codes": self.packed_codes(),
                                  "scale": self.scale.detach().to(torch.float16)}
        if self.zero is not None:
            out["zero"] = self.zero.detach().to(torch.float16)
        if self.col_scale is not None:
            out["col_scale"] = self.col_scale.detach().to(torch.float16)
        if self.k:
            idx_dtype = torch.int16 if self.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
            out["salient_idx"] = self.salient_idx.to(idx_dtype)
            out["salient_cols"] = self.salient_cols.detach().to(torch.float16)
        return out

    def packed_codes(self) -> Tensor:
        """The codes as a store keeps them: ``pack(codes, bits)``, ``uint8 [out, packed_cols(in - k, bits)]``."""
        return pack(self.codes, self.bits)

    def meta(self) -> dict[str, Any]:
        """The layer meta the manifest records for :meth:`fields`."""
        return {"method": self.method, "bits": self.bits, "shape": list(self.shape), "salient": self.k,
                "symmetric": self.symmetric}


class PackedQuantizedDelta(QuantizedDelta):
    """A :class:`QuantizedDelta` read from a store: ``packed`` (``uint8 [out, packed_cols(in - k, bits)]``,
    the stored bytes) is unpacked into :attr:`codes` only when they are first asked for, so a reader
    that takes the packed bytes as they are (:meth:`packed_codes`: the low-bit kernel's layout) never
    unpacks them. Otherwise the same record as ``QuantizedDelta(unpack(packed, bits, in - k), ...)``.
    """

    packed: Tensor

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
                 salient_idx: Tensor | None = None, salient_cols: Tensor | None = None,
                 col_scale: Tensor | None = None, method: str = "rtn", *, n_codes: int) -> None:
        check_bits(bits)
        try:
            check_packed(packed, bits, n_codes)
        except (TypeError, ValueError) as exc:
            raise DeltaFormatError(f"codes: {exc}") from exc
        if packed.dim() != 2:
            raise DeltaFormatError(f"packed codes must be uint8 [out, packed_cols(in - k, bits)], got "
                                   f"{list(packed.shape)}")
        object.__setattr__(self, "packed", packed)
        object.__setattr__(self, "_n_codes", n_codes)
        for name, value in (("scale", scale), ("zero", zero), ("bits", bits),
                            ("salient_idx", _no_columns().to(packed.device) if salient_idx is None else salient_idx),
                            ("salient_cols", salient_cols), ("col_scale", col_scale), ("method", method)):
            object.__setattr__(self, name, value)
        self.__post_init__()

    @functools.cached_property
    def codes(self) -> Tensor:  # type: ignore[override]
        """``uint8 [out, in - k]``, unpacked on first use."""
        return unpack(self.packed, self.bits, self._n_codes)

    def _code_shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self._n_codes

    @property
    def _device(self) -> torch.device:
        return self.packed.device

    def packed_codes(self) -> Tensor:
        return self.packed


@dataclass(frozen=True, eq=False)
class DenseDelta:
    """A delta kept whole: ``delta`` of the weight's shape (16 bit as stored)."""

    delta: Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)

    def dequantize(self) -> Tensor:
        """The delta as float32, same shape."""
        return self.delta.float()

    def fields(self) -> dict[str, Tensor]:
        return {"delta": self.delta.to(torch.float16)}

    def meta(self) -> dict[str, Any]:
        return {"method": "dense", "bits": 16, "shape": list(self.shape), "salient": 0}


@dataclass(frozen=True, eq=False)
class LowRankDelta:
    """A delta of rank ``r`` as two factors: ``delta = scale * b @ a`` (a LoRA adapter's layer).

    ``a: [r, in]`` (LoRA's ``lora_A``), ``b: [out, r]`` (``lora_B``), ``scale``: ``lora_alpha / r``
    (``/ sqrt(r)`` for rsLoRA). The factors are stored in 16 bit: bf16 as given, anything else as fp16.
    """

    a: Tensor
    b: Tensor
    scale: float

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise DeltaFormatError(f"lora delta: {name} must be a floating [{'r, in' if name == 'a' else 'out, r'}]"
                                       f" tensor, got {got}")
        if self.b.shape[1] != self.a.shape[0] or self.a.shape[0] == 0:
            raise DeltaFormatError(f"lora delta: a is {list(self.a.shape)} and b {list(self.b.shape)}; expected "
                                   "a: [r, in], b: [out, r] with the same r > 0")
        if not is_finite_number(self.scale):
            raise DeltaFormatError(f"lora delta {list(self.shape)}: scale must be a finite number, got {self.scale!r}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the whole delta."""
        return (self.b.shape[0], self.a.shape[1])

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def dequantize(self) -> Tensor:
        """The dense delta ``scale * b @ a``: float32 ``[out, in]``."""
        return (self.b.float() @ self.a.float()) * self.scale

    def fields(self) -> dict[str, Tensor]:
        """The tensors a store keeps (module docstring): the factors in 16 bit."""
        return {"lora_a": _half(self.a), "lora_b": _half(self.b)}

    def meta(self) -> dict[str, Any]:
        return {"method": LOW_RANK, "bits": 16, "shape": list(self.shape), "salient": 0, "rank": self.rank,
                "scale": float(self.scale)}


def _half(t: Tensor) -> Tensor:
    """``t`` detached in 16 bit: bf16 kept, anything else as fp16."""
    return t.detach().to(t.dtype if t.dtype in HALF_DTYPES else torch.float16)


LayerDelta = QuantizedDelta | DenseDelta | LowRankDelta


def _shape(meta: Mapping[str, Any]) -> list[int]:
    try:
        return [int(d) for d in meta["shape"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaFormatError(f"layer meta needs a shape list, got {meta.get('shape')!r}") from exc


def decode(fields: Mapping[str, Tensor], meta: Mapping[str, Any]) -> LayerDelta:
    """The record that ``fields`` (a store's tensors of one layer) and ``meta`` describe.

    Raises :class:`DeltaFormatError` naming the method, shape and field when they disagree.
    """
    method = meta.get("method")
    shape = _shape(meta)
    if method == "dense":
        if "delta" not in fields:
            raise DeltaFormatError(f"dense delta {shape} lacks its 'delta' tensor; has {sorted(fields)}")
        if list(fields["delta"].shape) != shape:
            raise DeltaFormatError(f"dense delta: meta says {shape}, the tensor is {list(fields['delta'].shape)}")
        return DenseDelta(fields["delta"])
    if method == LOW_RANK:
        return _decode_low_rank(fields, meta, shape)
    if method not in METHODS:
        raise DeltaFormatError(f"unknown method {method!r} in layer meta; expected 'dense', {LOW_RANK!r} or one of "
                               f"{METHODS}")
    if len(shape) != 2:
        raise DeltaFormatError(f"a {method} delta must be [out, in], meta says {shape}")
    out, n = shape
    try:
        bits, k = int(meta["bits"]), int(meta.get("salient", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise DeltaFormatError(f"{method} delta {shape}: meta needs integer bits and salient") from exc
    need = ["codes", "scale"] + (["salient_idx", "salient_cols"] if k else [])
    need += ["col_scale"] if method == "sign2d" else []
    if missing := [f for f in need if f not in fields]:
        raise DeltaFormatError(f"{method} delta {shape} lacks stored field(s) {missing}; has {sorted(fields)}")
    if not 0 <= k <= n:
        raise DeltaFormatError(f"{method} delta {shape}: salient count {k} outside [0, {n}]")
    packed = fields["codes"]
    try:
        check_packed(packed, bits, n - k)
    except (TypeError, ValueError) as exc:
        raise DeltaFormatError(f"{method} delta {shape}: codes: {exc}") from exc
    if packed.dim() != 2 or packed.shape[0] != out:
        raise DeltaFormatError(f"{method} delta {shape}: codes have {packed.shape[0]} rows, expected {out}"
                               if packed.dim() == 2 else
                               f"{method} delta {shape}: codes must be [out, packed bytes], got {list(packed.shape)}")
    idx = fields["salient_idx"].long() if k else _no_columns().to(packed.device)
    if idx.shape != (k,):
        raise DeltaFormatError(f"{method} delta {shape}: salient_idx must be [k]=[{k}], got {list(idx.shape)}")
    if k and (int(idx.min()) < 0 or int(idx.max()) >= n or len(torch.unique(idx)) != k):
        raise DeltaFormatError(f"{method} delta {shape}: salient_idx must name {k} distinct columns in [0, {n})")
    return PackedQuantizedDelta(  # codes unpacked on first use (the low-bit kernel's layout reads them packed)
        packed,
        n_codes=n - k,
        scale=fields["scale"].float(),
        zero=fields["zero"].float() if "zero" in fields else None,
        bits=bits,
        salient_idx=idx,
        salient_cols=fields["salient_cols"] if k else None,
        col_scale=fields["col_scale"].float() if method == "sign2d" else None,
        method=method,
    )


def _decode_low_rank(fields: Mapping[str, Tensor], meta: Mapping[str, Any], shape: list[int]) -> LowRankDelta:
    """The :class:`LowRankDelta` of stored ``lora_a: [r, in]``, ``lora_b: [out, r]`` and meta ``rank``, ``scale``."""
    if len(shape) != 2:
        raise DeltaFormatError(f"a lora delta must be [out, in], meta says {shape}")
    if missing := [f for f in ("lora_a", "lora_b") if f not in fields]:
        raise DeltaFormatError(f"lora delta {shape} lacks stored field(s) {missing}; has {sorted(fields)}")
    rank, scale = meta.get("rank"), meta.get("scale")
    if not is_positive_int(rank):
        raise DeltaFormatError(f"lora delta {shape}: meta needs a positive integer rank, got {rank!r}")
    if not is_finite_number(scale):
        raise DeltaFormatError(f"lora delta {shape}: meta needs a finite number scale, got {scale!r}")
    out, n = shape
    a, b = fields["lora_a"], fields["lora_b"]
    for name, t, want in (("lora_a", a, [rank, n]), ("lora_b", b, [out, rank])):
        if list(t.shape) != want:
            raise DeltaFormatError(f"lora delta {shape}, rank {rank}: {name} must be {want}, got {list(t.shape)}")
        if not t.is_floating_point():
            raise DeltaFormatError(f"lora delta {shape}: {name} must be floating point, got {t.dtype}")
    return LowRankDelta(a, b, float(scale))


def decode_delta(fields: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Tensor:
    """The dense float32 delta of stored tensors: ``[out, in]`` (or the stored shape for ``dense``)."""
    return decode(fields, meta).dequantize()
