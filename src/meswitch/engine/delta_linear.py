"""Linear layers over many compressed expert deltas: ``y[i] = x[i] @ (W_base + delta_{e_i})^T + b``.

Shape legend: ``T`` rows in a batch (one row = one token of one sequence), ``n`` rows of one
segment, ``in``/``out`` the layer's features, ``k`` salient input columns, ``in - k`` quantized ones.
``expert_ids: [T]``, ``-1`` = base only. Deltas are as :mod:`meswitch.compress.codec` stores them.

Semantics in plain PyTorch (:func:`delta_matmul_reference`, the slow and obvious path)::

    y = x @ W_base.T + bias                                  # [T, out]
    for i, e in enumerate(expert_ids):
        if e >= 0:
            y[i] += x[i] @ decode_delta(fields[e], meta[e]).T

:func:`delta_matmul` is the fast path: rows sorted by expert (:class:`Segments`), one matmul per
segment (Punica's SGMV idea). :meth:`PackedDelta.matmul` computes ``x @ delta^T`` from the stored
parts without the dense delta, ``x_s = x[:, salient_idx]``, ``x_r = x[:, rest_idx]``, codes ``c``::

    x @ delta^T = x_s @ salient_cols^T + q
    q = (x_r @ c^T - m * x_r.sum(1, keepdim=True)) * scale    # symmetric, m = (2**bits - 1) / 2
    q = (x_r @ c^T) * scale + x_r.sum(1, keepdim=True) * zero # asymmetric

with ``scale``/``zero: [out]`` broadcast over the output columns (``[1]`` for bitdelta). The math is
float32; results are float32 (or accumulated into a caller's ``y`` in its dtype).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meswitch.compress.pack import check_bits, pack, packed_cols, unpack
from meswitch.compress.quant import dequantize, sign2d_dequantize
from meswitch.engine.segments import Segments
from meswitch.errors import MeswitchError

Resident = Literal["codes", "dense", "int4", "lowbit"] | None
RESIDENCY: tuple[Resident, ...] = (None, "codes", "dense", "int4", "lowbit")
MODES = ("reference", "segment-dense", "segment-structured", "merged")
# What each mode keeps resident per expert, beside the packed codes (see MultiExpertLinear).
MODE_RESIDENT: dict[str, Resident] = {
    "reference": None,
    "segment-dense": "dense",
    "segment-structured": "codes",
    "merged": None,
}
_METHODS = ("salient", "rtn", "bitdelta", "sign2d")


class DeltaFormatError(MeswitchError, ValueError):
    """Stored delta tensors or meta do not describe a quantized linear-layer delta."""


class MissingDeltaError(MeswitchError, LookupError):
    """A batch row names an expert that has no delta resident in this layer."""


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True, eq=False)
class PackedDelta:
    """One layer's delta of one expert, kept packed; computes ``x @ delta^T`` from its parts.

    ``packed: uint8 [out, packed_cols(in - k, bits)]`` (codes of the quantized columns),
    ``scale: float32 [out]`` (``[1]`` for bitdelta), ``zero: float32 [out] | None`` (asymmetric grid),
    ``salient_idx: int64 [k]``, ``salient_cols: float32 [out, k]``, ``rest_idx: int64 [in - k]``
    (the quantized columns, ascending), ``shape = (out, in)``. Optionally resident beside the
    packed codes (:meth:`set_resident`): the unpacked codes as float32 ``[out, in - k]``, the dense
    delta ``[out, in]`` or the int4 kernel's form; or in their place, the low-bit kernel's layout
    (``packed`` is then ``[out, 0]``: read the codes through :meth:`codes` or :meth:`stored_codes`).
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor | None
    salient_idx: Tensor
    salient_cols: Tensor
    rest_idx: Tensor
    bits: int
    shape: tuple[int, int]
    method: str
    col_scale: Tensor | None = None  # sign2d: float32 [in - k], level = (2c - 1) * scale_j * col_scale_i
    _cache: dict[str, Tensor] = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        out, n = self.shape
        k = self.salient_idx.shape[0]
        expect: dict[str, tuple[int, ...]] = {
            "packed": (out, packed_cols(n - k, self.bits)),
            "salient_cols": (out, k),
            "rest_idx": (n - k,),
        }
        if self.method == "bitdelta":
            expect["scale"] = (1,)
        else:
            expect["scale"] = (out,)
        if self.zero is not None:
            expect["zero"] = (out,)
        if self.col_scale is not None:
            expect["col_scale"] = (n - k,)
        for name, want in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != want:
                raise DeltaFormatError(
                    f"{self.method} delta {list(self.shape)}: {name} must be {list(want)}, got {list(got)}"
                )
        if self.packed.dtype != torch.uint8:
            raise DeltaFormatError(f"packed codes must be uint8, got {self.packed.dtype}")

    @classmethod
    def from_fields(
        cls, fields: Mapping[str, Tensor], meta: Mapping[str, Any], resident: Resident = None
    ) -> PackedDelta:
        """Build from what :func:`~meswitch.compress.codec.encode_delta` stores (``salient``/``rtn``/``bitdelta``)."""
        method = meta.get("method")
        if method not in _METHODS:
            raise DeltaFormatError(
                f"a linear-layer delta must use one of {_METHODS}, meta names method {method!r}"
            )
        try:
            out, n = (int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeltaFormatError(f"meta shape must be [out, in], got {meta.get('shape')!r}") from e
        bits, k = int(meta["bits"]), int(meta.get("salient", 0))
        need = ["codes", "scale"] + (["salient_idx", "salient_cols"] if k else [])
        need += ["col_scale"] if method == "sign2d" else []
        if missing := [f for f in need if f not in fields]:
            raise DeltaFormatError(
                f"{method} delta {[out, n]} lacks stored field(s) {missing}; has {sorted(fields)}"
            )
        idx = fields["salient_idx"].long() if k else torch.zeros(0, dtype=torch.long)
        if idx.dim() != 1 or idx.shape[0] != k:
            raise DeltaFormatError(f"salient_idx must be [k]=[{k}], got {list(idx.shape)}")
        device = fields["codes"].device
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[idx.to(device)] = False
        delta = cls(
            packed=fields["codes"],
            scale=fields["scale"].float(),
            zero=fields["zero"].float() if "zero" in fields else None,
            salient_idx=idx.to(device),
            salient_cols=fields["salient_cols"].float() if k else torch.zeros(out, 0, device=device),
            rest_idx=keep.nonzero().squeeze(1),
            bits=bits,
            shape=(out, n),
            method=method,
            col_scale=fields["col_scale"].float() if method == "sign2d" else None,
        )
        return delta.set_resident(resident)

    @property
    def k(self) -> int:
        """Number of salient (float) input columns."""
        return self.salient_idx.shape[0]

    @property
    def fused(self) -> Any:
        """A fused CPU kernel's form when resident, else None: :class:`~meswitch.engine.lowbit_cpu.LowbitDelta`
        or :class:`~meswitch.engine.int4.Int4Delta` (both have ``matmul``, ``nbytes``, ``unit_scale``)."""
        return getattr(self, "_fused", None)

    def use_fused(self, fused: Any) -> None:
        """Hold ``fused`` (the same codes, e.g. a view into layers stacked by ``concat``) as the fused form."""
        if self.fused is None:
            raise ValueError("no fused form is resident to replace")
        object.__setattr__(self, "_fused", fused)

    @property
    def resident(self) -> Resident:
        """What is resident for speed: ``"lowbit"`` (in place of the packed codes), ``"int4"``, ``"dense"`` or
        ``"codes"`` (beside them) or None."""
        if self.fused is not None:
            from meswitch.engine.lowbit_cpu import LowbitDelta

            return "lowbit" if isinstance(self.fused, LowbitDelta) else "int4"
        return "dense" if "dense" in self._cache else "codes" if "codes" in self._cache else None

    @property
    def codes_in_fused(self) -> bool:
        """Whether the codes are held only in the low-bit kernel's layout (``packed`` released, see :meth:`set_resident`)."""
        return getattr(self, "_codes_in_fused", False)

    def codes(self) -> Tensor:
        """Unpacked codes of the quantized columns: ``uint8 [out, in - k]``."""
        if self.codes_in_fused:
            from meswitch.engine.lowbit_cpu import unlayout

            fused = self.fused
            full = unlayout(fused.packed, fused.bits, *self.shape)
            return full.index_select(1, self.rest_idx) if self.k else full
        return unpack(self.packed, self.bits, self.shape[1] - self.k)

    def stored_codes(self) -> Tensor:
        """The codes as stored: ``uint8 [out, packed_cols(in - k, bits)]`` (repacked if only the kernel layout holds them)."""
        return pack(self.codes(), self.bits) if self.codes_in_fused else self.packed

    def dense(self) -> Tensor:
        """The dense delta ``float32 [out, in]``, the same numbers as ``decode_delta`` (cached one if resident)."""
        if "dense" in self._cache:
            return self._cache["dense"]
        if self.col_scale is not None:
            rest = sign2d_dequantize(self.codes(), self.scale, self.col_scale)
        else:
            rest = dequantize(self.codes(), self.scale, self.zero, self.bits)
        if not self.k:
            return rest
        full = rest.new_zeros(self.shape)
        full.index_copy_(1, self.rest_idx, rest)
        return full.index_copy_(1, self.salient_idx, self.salient_cols)

    def set_resident(self, what: Resident) -> PackedDelta:
        """Cache ``"codes"`` (float32 ``[out, in - k]``), ``"dense"`` (``[out, in]``), a fused CPU
        kernel's form or nothing; returns self.

        ``"lowbit"``: the low-bit VNNI kernel's layout (:mod:`~meswitch.engine.lowbit_cpu`), which then
        holds the codes alone (``packed`` is released and :meth:`codes` reads the layout: the same
        codes, in 4-bit slots for 3-bit ones), else (column-scaled sign2d deltas, no such kernel on
        this machine) the int4 form. ``"int4"``: PyTorch's int4 layout (:mod:`~meswitch.engine.int4`).
        Shapes neither kernel takes keep the exact path.
        """
        if what not in RESIDENCY:
            raise ValueError(f"resident must be one of {RESIDENCY}, got {what!r}")
        if self.codes_in_fused:  # the layout is about to go: the stored codes come back first
            object.__setattr__(self, "packed", self.stored_codes())
            object.__setattr__(self, "_codes_in_fused", False)
        self._cache.clear()
        object.__setattr__(self, "_fused", None)
        if what == "codes":
            self._cache["codes"] = self.codes().float()
        elif what == "dense":
            self._cache["dense"] = self.dense()
        elif what in ("int4", "lowbit"):
            from meswitch.engine import int4, lowbit_cpu

            if what == "lowbit" and self.col_scale is None:
                low = lowbit_cpu.build(self.codes(), self.rest_idx, self.scale, self.zero, self.bits, self.shape)
                if low is not None:
                    object.__setattr__(self, "_fused", low)
                    object.__setattr__(self, "_codes_in_fused", True)
                    object.__setattr__(self, "packed", self.packed.new_empty(self.shape[0], 0))
                    return self
            fused = int4.build(self.codes(), self.rest_idx, self.scale, self.zero, self.bits, self.shape,
                               self.col_scale)
            object.__setattr__(self, "_fused", fused)
        return self

    def nbytes(self) -> int:
        """Bytes held in memory: stored parts (as held, float32/int64) plus whatever is resident."""
        held = _nbytes(self.packed, self.scale, self.zero, self.salient_idx, self.salient_cols, self.rest_idx,
                       self.col_scale)
        fused = self.fused
        return held + _nbytes(*self._cache.values()) + (fused.nbytes() if fused is not None else 0)

    def to(self, device: torch.device | str) -> PackedDelta:
        """A copy on ``device`` with the same residency."""
        moved = PackedDelta(
            self.stored_codes().to(device),
            self.scale.to(device),
            None if self.zero is None else self.zero.to(device),
            self.salient_idx.to(device),
            self.salient_cols.to(device),
            self.rest_idx.to(device),
            self.bits,
            self.shape,
            self.method,
            None if self.col_scale is None else self.col_scale.to(device),
        )
        moved._cache.update({name: t.to(device) for name, t in self._cache.items()})
        return moved

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> ``x @ delta^T: float32 [n, out]`` from the parts (module docstring).

        Uses the dense delta if resident, else the float codes if resident, else unpacks per call.
        """
        if x.dim() != 2 or x.shape[1] != self.shape[1]:
            raise ValueError(f"x must be [n, in={self.shape[1]}], got shape {tuple(x.shape)}")
        xf = x.float()
        if "dense" in self._cache:
            return xf @ self._cache["dense"].T
        fused = self.fused
        if fused is not None:
            y = fused.matmul(xf)
            if self.k:
                y.addmm_(xf.index_select(1, self.salient_idx), self.salient_cols.T)
            return y
        c = self._cache["codes"] if "codes" in self._cache else self.codes().float()  # [out, in - k]
        x_r = xf.index_select(1, self.rest_idx) if self.k else xf  # [n, in - k]
        scale = self.scale
        if self.col_scale is not None:  # sign2d: (2c - 1) r_j c_i = (c - 1/2) * 2 r_j, columns scaled by c_i
            x_r, scale = x_r * self.col_scale, self.scale * 2
        x_sum = x_r.sum(1, keepdim=True)  # [n, 1]
        y = x_r @ c.T  # [n, out]
        if self.zero is None:
            y.sub_(x_sum, alpha=((1 << self.bits) - 1) / 2).mul_(scale)
        else:
            y.mul_(self.scale).addcmul_(x_sum, self.zero)
        if self.k:
            y.addmm_(xf.index_select(1, self.salient_idx), self.salient_cols.T)
        return y


def _accumulator(x: Tensor, deltas: Mapping[int, PackedDelta], y: Tensor | None) -> Tensor:
    """``y`` checked to be ``[T, out]``, or float32 zeros ``[T, out]`` with ``out`` from the deltas."""
    if y is None:
        if not deltas:
            raise ValueError("no deltas to infer out_features from; pass y: [T, out]")
        out = next(iter(deltas.values())).shape[0]
        return torch.zeros(x.shape[0], out, device=x.device)
    if y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be [T={x.shape[0]}, out], got shape {tuple(y.shape)}")
    return y


def _lookup(deltas: Mapping[int, PackedDelta], e: int) -> PackedDelta:
    if e not in deltas:
        raise MissingDeltaError(
            f"expert {e} has no delta resident in this layer (resident: {sorted(deltas)})"
        )
    return deltas[e]


def delta_matmul_reference(
    x: Tensor, expert_ids: Sequence[int], deltas: Mapping[int, PackedDelta], y: Tensor | None = None
) -> Tensor:
    """Slow reference: ``y[i] += x[i] @ deltas[expert_ids[i]].dense().T``, nothing for ``-1``.

    ``x: [T, in]``, ``expert_ids: [T]``, ``y: [T, out]`` accumulated in place when given (float32
    zeros otherwise); returns ``y``.
    """
    if x.dim() != 2 or len(expert_ids) != x.shape[0]:
        raise ValueError(f"x must be [T={len(expert_ids)}, in], got shape {tuple(x.shape)}")
    y = _accumulator(x, deltas, y)
    dense = {e: _lookup(deltas, e).dense() for e in set(expert_ids) if e >= 0}  # once per expert
    for i, e in enumerate(expert_ids):
        if e >= 0:
            y[i] += (x[i].float() @ dense[e].T).to(y.dtype)
    return y


def delta_matmul(
    x: Tensor, segments: Segments, deltas: Mapping[int, PackedDelta], y: Tensor | None = None
) -> Tensor:
    """Fast path of :func:`delta_matmul_reference`: one ``PackedDelta.matmul`` per expert segment.

    ``x: [T, in]`` in batch order, ``segments`` over its ``T`` rows, ``y: [T, out]`` accumulated in
    place when given (float32 zeros otherwise); returns ``y``. Equivalent to::

        xs = x[segments.order]
        for e, s, t in segments:            # skipping e == -1
            y[segments.order[s:t]] += deltas[e].matmul(xs[s:t])
    """
    if x.dim() != 2 or x.shape[0] != segments.num_rows:
        raise ValueError(f"x must be [T={segments.num_rows}, in], got shape {tuple(x.shape)}")
    y = _accumulator(x, deltas, y)
    xs = segments.gather(x)  # [T, in], experts contiguous
    for j, (e, s, t) in enumerate(segments):
        if e < 0 or s == t:
            continue
        ys = _lookup(deltas, e).matmul(xs[s:t]).to(y.dtype)  # [t - s, out]
        if segments.is_sorted:
            y[s:t].add_(ys)
        else:
            y.index_add_(0, segments.rows(j).to(y.device), ys)
    return y


class MultiExpertLinear(nn.Module):
    """A base ``nn.Linear`` plus resident expert deltas: ``forward(x: [T, in], segments) -> [T, out]``.

    Row ``i`` computes ``x[i] @ (W_base + delta_{e_i})^T + bias`` (``delta_{-1} = 0``). ``mode``:

    - ``"reference"``: :func:`delta_matmul_reference` (dense delta per call, row by row).
    - ``"segment-dense"``: each delta's dense ``[out, in]`` cached, one matmul per segment.
    - ``"segment-structured"``: :meth:`PackedDelta.matmul` per segment (float codes cached unless
      ``resident`` says otherwise).
    - ``"merged"``: a batch of one expert runs one matmul on a cached ``W_base + delta`` (one
      merged weight at a time, rebuilt when the expert changes); a mixed batch falls back to the
      segment path with whatever each delta has resident (nothing by default).

    Deltas are moved to the base weight's device when added; after moving the module, call
    :meth:`set_deltas` again. The merged cache assumes the base weight does not change.
    """

    def __init__(
        self,
        base: nn.Linear,
        deltas: Mapping[int, PackedDelta] | None = None,
        mode: str = "segment-structured",
        resident: Resident | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.base = base
        self.deltas: dict[int, PackedDelta] = {}
        self._merged: tuple[int, Tensor] | None = None
        self.mode, self._resident = "reference", resident
        self.set_mode(mode, resident)
        self.set_deltas(deltas or {})

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def set_mode(self, mode: str, resident: Resident | Literal["auto"] = "auto") -> None:
        """Switch mode; sets each delta's residency (``"auto"``: :data:`MODE_RESIDENT` of the mode)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if resident != "auto" and resident not in RESIDENCY:
            raise ValueError(f"resident must be 'auto' or one of {RESIDENCY}, got {resident!r}")
        self.mode, self._resident, self._merged = mode, resident, None
        for d in self.deltas.values():
            d.set_resident(self._residency())

    def _residency(self) -> Resident:
        return MODE_RESIDENT[self.mode] if self._resident == "auto" else self._resident

    def set_deltas(self, deltas: Mapping[int, PackedDelta]) -> None:
        """Replace all resident deltas with ``deltas`` (expert index -> delta of this layer)."""
        self.deltas, self._merged = {}, None
        for idx, d in deltas.items():
            self.add_delta(idx, d)

    def add_delta(self, idx: int, delta: PackedDelta) -> None:
        """Make expert ``idx`` resident (replacing any previous delta of it)."""
        if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
            raise ValueError(f"expert index must be an int >= 0, got {idx!r}")
        want = (self.out_features, self.in_features)
        if tuple(delta.shape) != want:
            raise ValueError(f"expert {idx}: delta is {list(delta.shape)}, the base weight {list(want)}")
        device = self.base.weight.device
        if delta.packed.device != device:
            delta = delta.to(device)
        self.deltas[idx] = delta.set_resident(self._residency())
        if self._merged is not None and self._merged[0] == idx:
            self._merged = None

    def remove_delta(self, idx: int) -> PackedDelta:
        """Evict expert ``idx``; returns its delta. Raises :class:`MissingDeltaError` if absent."""
        delta = _lookup(self.deltas, idx)
        del self.deltas[idx]
        if self._merged is not None and self._merged[0] == idx:
            self._merged = None
        return delta

    def nbytes(self) -> int:
        """Bytes held by the deltas (with their residency) and the merged weight, not the base."""
        merged = self._merged[1] if self._merged is not None else None
        return sum(d.nbytes() for d in self.deltas.values()) + _nbytes(merged)

    def merged_weight(self, idx: int) -> Tensor:
        """``W_base + delta_idx: [out, in]`` in the base weight's dtype, cached for the last ``idx``."""
        if self._merged is None or self._merged[0] != idx:
            w = self.base.weight.detach()
            self._merged = (idx, (w.float() + _lookup(self.deltas, idx).dense()).to(w.dtype))
        return self._merged[1]

    def forward(self, x: Tensor, segments: Segments) -> Tensor:
        """``x: [T, in]``, ``segments`` over its rows -> ``[T, out]`` in the base output dtype."""
        if x.dim() != 2 or x.shape != (segments.num_rows, self.in_features):
            raise ValueError(
                f"x must be [T={segments.num_rows}, in={self.in_features}], got shape {tuple(x.shape)}"
            )
        single = segments.single_expert
        if self.mode == "merged" and single is not None:
            w = self.merged_weight(single) if single >= 0 else self.base.weight
            return F.linear(x, w, self.base.bias)
        y = self.base(x)  # [T, out]
        if self.mode == "reference":
            return delta_matmul_reference(x, segments.expert_ids, self.deltas, y)
        return delta_matmul(x, segments, self.deltas, y)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, experts={sorted(self.deltas)}"
