"""A CPU kernel for mixed batches that reads 1-, 2- or 4-bit delta codes: int8 dot products (AVX512-VNNI or AVX2).

One call per layer computes every expert's delta on its rows (Punica's SGMV, for quantized
full-rank deltas on a CPU)::

    for (delta, s, t) in forms:  y[s:t] += x_hat[s:t] @ delta^T      # x: [T, in], y: [T, out]

``x_hat`` is ``x`` quantized to int8 per row and per :data:`GROUP` input columns (absmax / 127),
so the delta term is approximate to about 8 bits, as the int4 path's bf16 activations are; the
codes, step sizes and zero terms are exact. The codes stay low-bit in memory (3-bit codes take
4-bit slots): ``bits / 8`` bytes per weight, half of PyTorch's int4 layout at 2 bits and a quarter
at 1 bit, and the kernel multiplies 64 codes by 4 activations per instruction (``vpdpbusd``) with
any number of rows, where ``torch._weight_int4pack_mm_for_cpu`` charges 5 to 8 rows as 8 (docs/engine.md).

The C++ source (``csrc/lowbit_cpu.cpp``) is compiled on first use by
:func:`torch.utils.cpp_extension.load` (about 30 s, then cached under the meswitch cache), for the
best instruction set the CPU has (:data:`ISAS`: AVX512-VNNI, else AVX2 with the same layout and
results). Without a compiler or either instruction set, :func:`available` is False and callers keep
the int4 path; :func:`sgmv_reference` is the plain PyTorch statement of what the kernel computes.

Layout of one delta (:func:`layout`): codes ``c: [out, in]`` in tiles of 16 output rows by 4 input
columns (64 bytes, byte ``4 * o + j`` holds ``c[o, 4 * q + j]``, the operand layout of ``vpdpbusd``),
``8 / bits`` consecutive tiles sharing one 64-byte chunk (tile ``p`` in bits ``[bits * p, bits * (p + 1))``):
``uint8 [ceil(out / 16), Kp / (32 / bits), 64]``, ``Kp`` = ``in`` rounded up to :data:`GROUP`.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from meswitch.engine.kernels.cpu_build import compile_kernel, cpu_flags

GROUP = 64  # input columns per activation scale
BLOCK = 16  # output rows per tile
LAYOUT_BITS = {1: 1, 2: 2, 3: 4, 4: 4}  # stored bits -> bits per code in the kernel's layout
_SOURCE = Path(__file__).parent / "csrc" / "lowbit_cpu.cpp"
# One build per instruction set, best first: (CPU flags it needs, compiler flags).
ISAS: dict[str, tuple[frozenset[str], list[str]]] = {
    "avx512_vnni": (frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}),
                    ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"]),
    "avx2": (frozenset({"avx2", "fma"}), ["-mavx2", "-mfma"]),
}


def supported_isas() -> list[str]:
    """The instruction sets of :data:`ISAS` this CPU has, best first."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = cpu_flags()
    return [name for name, (need, _) in ISAS.items() if need <= flags]


@functools.cache
def _build(isa: str) -> tuple[object | None, str | None]:
    """The kernel compiled for ``isa``, or None and why not."""
    if isa not in supported_isas():
        return None, f"this CPU ({platform.machine()}) lacks {isa}"
    return compile_kernel(f"meswitch_lowbit_cpu_{isa}", f"lowbit_cpu-{isa}", _SOURCE, ISAS[isa][1],
                          f"low-bit CPU kernel ({isa})")


ENV = "MESWITCH_LOWBIT_CPU"  # read by callers at start-up (choose(None)): "0" (off), an ISA name, or unset (best)


@functools.cache
def _select(want: str) -> tuple[str | None, str | None]:
    """(ISA, None) of the build for a requested value (``""``: the best this CPU has), or (None, why none)."""
    if want == "0":
        return None, f"disabled by {ENV}=0"
    if want:
        if want not in ISAS:
            return None, f"{ENV}={want!r}: not one of {list(ISAS)} or 0"
        mod, why = _build(want)
        return (want, None) if mod is not None else (None, why)
    reasons = []
    for isa in supported_isas():
        mod, why = _build(isa)
        if mod is not None:
            return isa, None
        reasons.append(f"{isa}: {why}")
    return None, "; ".join(reasons) or f"no supported instruction set ({', '.join(ISAS)}) on this CPU"


def choose(want: str | None = None) -> tuple[str | None, str | None]:
    """The build to use: (ISA, None), or (None, why there is none); builds on first call.

    ``want``: ``"0"`` (off), an ISA of :data:`ISAS`, ``""`` (the best this CPU has) or None (the
    value of ``MESWITCH_LOWBIT_CPU``, read now: call this once, at start-up).
    """
    return _select(os.environ.get(ENV, "") if want is None else want)


def available(want: str | None = None) -> bool:
    """Whether :func:`choose` finds a build that runs on this CPU."""
    return choose(want)[0] is not None


def unavailable_reason(want: str | None = None) -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return choose(want)[1]


def isa(want: str | None = None) -> str | None:
    """The instruction set :func:`choose` picks (None: unavailable)."""
    return choose(want)[0]


@dataclass(frozen=True, eq=False)
class LowbitDelta:
    """One delta's quantized columns in the kernel's layout: ``packed: uint8 [ceil(out / 16), Kp * bits / 32, 64]``,
    ``scale``, ``zero: float32 [out]`` (level of code ``c`` in output ``o``: ``c * scale[o] + zero[o]``),
    ``bits`` in the layout (1, 2 or 4), ``shape = (out, in)``. ``salient_idx: int64 [k]``: columns kept
    apart in 16 bit, whose code slots hold 0 (their level ``zero[o]`` is taken back out by
    :meth:`matmul`); the caller adds their own part."""

    packed: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    shape: tuple[int, int]
    isa: str
    salient_idx: Tensor | None = None

    @property
    def unit_scale(self) -> bool:
        """Whether one kernel call gives the whole delta (no salient columns)."""
        return self.salient_idx is None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero, self.salient_idx)
                   if t is not None)

    def matmul(self, x: Tensor) -> Tensor:
        """``x: [n, in]`` -> float32 ``[n, out]``: the quantized columns' part of ``x_hat @ delta^T``."""
        y = torch.zeros(x.shape[0], self.shape[0], dtype=torch.float32)
        sgmv(x, y, [(self, 0, x.shape[0])], self.isa)
        if self.salient_idx is not None:  # their 0 codes still met the zero term: z_o * x[:, salient].sum(1)
            y.addr_(x.float().index_select(1, self.salient_idx).sum(1), self.zero, alpha=-1)
        return y


def layout(codes: Tensor, bits: int) -> Tensor:
    """``codes: uint8 [out, in]`` (each below ``2**bits``) -> the kernel's ``uint8 [ceil(out/16), Kp*bits/32, 64]``."""
    if bits not in (1, 2, 4):
        raise ValueError(f"layout bits must be 1, 2 or 4, got {bits}")
    out, n = codes.shape
    nb, kp = -(-out // BLOCK), -(-n // GROUP) * GROUP
    full = torch.zeros(nb * BLOCK, kp, dtype=torch.uint8)
    full[:out, :n] = codes
    tiles = full.view(nb, BLOCK, kp // 4, 4).permute(0, 2, 1, 3).reshape(nb, kp // 4, 64)  # [NB, quads, 64]
    planes = 8 // bits
    tiles = tiles.view(nb, kp // 4 // planes, planes, 64)
    packed = tiles[:, :, 0].clone()
    for p in range(1, planes):
        packed |= tiles[:, :, p] << (bits * p)
    return packed


def layout_packed(packed: Tensor, bits: int, n: int, rest_idx: Tensor | None = None, width: int | None = None,
                  isa: str | None = None) -> Tensor:
    """The kernel's layout straight from a store's packed codes, in one pass of the extension.

    ``packed: uint8 [out, packed_cols(n, bits)]`` (:func:`meswitch.deltas.pack.pack` of ``n`` codes at
    ``bits`` in 1 .. 4) -> ``layout(codes, LAYOUT_BITS[bits])`` (3-bit codes in 4-bit slots), the
    same bytes as ``layout(unpack(packed, bits, n), LAYOUT_BITS[bits])``. With ``rest_idx: int64 [n]``,
    code column ``k`` goes to input column ``rest_idx[k]`` of ``width`` columns, the others' slots 0
    (:func:`build`'s salient columns). ``isa``: the build to run (None: the best; any build gives the
    same bytes); without one, the same in PyTorch.
    """
    from meswitch.deltas.pack import check_packed, unpack

    check_packed(packed, bits, n)
    if packed.dim() != 2:
        raise ValueError(f"packed must be uint8 [out, packed bytes], got {list(packed.shape)}")
    if rest_idx is not None and len(rest_idx) != n:
        raise ValueError(f"rest_idx names {len(rest_idx)} columns, the packed rows hold {n} codes")
    width = n if width is None else width
    if rest_idx is None and width != n:
        raise ValueError(f"width {width} without rest_idx: must be n = {n}")
    lb = LAYOUT_BITS[bits]
    chosen, _ = choose(isa if isa is not None else "")
    mod = None if chosen is None or packed.device.type != "cpu" else _build(chosen)[0]
    if mod is None or not hasattr(mod, "layout_packed"):
        codes = unpack(packed, bits, n)
        if rest_idx is not None:
            codes = torch.zeros(codes.shape[0], width, dtype=torch.uint8).index_copy_(1, rest_idx.cpu(), codes.cpu())
        return layout(codes.cpu(), lb)
    cols = torch.zeros(0, dtype=torch.int64) if rest_idx is None else rest_idx.to(torch.int64)
    return mod.layout_packed(packed, bits, n, cols, width, lb)


def unlayout(packed: Tensor, bits: int, out: int, n: int) -> Tensor:
    """Inverse of :func:`layout`: ``uint8 [ceil(out/16), Kp*bits/32, 64]`` -> codes ``uint8 [out, n]``."""
    nb, chunks, _ = packed.shape
    mask = (1 << bits) - 1
    planes = torch.stack([(packed >> (bits * p)) & mask for p in range(8 // bits)], 2)  # [NB, C, P, 64]
    tiles = planes.view(nb, chunks * (8 // bits), BLOCK, 4).permute(0, 2, 1, 3)  # [NB, 16, quads, 4]
    return tiles.reshape(nb * BLOCK, -1)[:out, :n].contiguous()


def build(codes: Tensor, rest_idx: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
          shape: tuple[int, int], isa: str) -> LowbitDelta | None:
    """The kernel's form of a delta's quantized columns; None where the kernel is unavailable or the
    codes are not on the CPU.

    ``codes: uint8 [out, in - k]`` (unpacked) of the columns ``rest_idx: int64 [in - k]``,
    ``scale: [out]`` or ``[1]``, ``zero: [out] | None`` (None: symmetric levels ``(c - m) * scale``,
    ``m = (2**bits - 1) / 2``). Column-scaled (sign2d) deltas are not taken.
    """
    out, n = shape
    if codes.device.type != "cpu" or codes.shape[0] != out or not available(isa):
        return None
    salient = None
    if len(rest_idx) != n:  # salient columns: code slots of 0 there
        full = torch.zeros(out, n, dtype=torch.uint8)
        full.index_copy_(1, rest_idx, codes)
        codes, salient = full, _salient(rest_idx, n)
    return _delta(layout(codes, LAYOUT_BITS[bits]), scale, zero, bits, shape, isa, salient)


def build_packed(packed: Tensor, rest_idx: Tensor, scale: Tensor, zero: Tensor | None, bits: int,
                 shape: tuple[int, int], isa: str) -> LowbitDelta | None:
    """:func:`build` of the codes ``unpack(packed, bits, len(rest_idx))`` (a store's ``packed: uint8
    [out, packed_cols(in - k, bits)]``), laid out in one pass (:func:`layout_packed`) without unpacking them."""
    out, n = shape
    if packed.device.type != "cpu" or packed.dim() != 2 or packed.shape[0] != out or not available(isa):
        return None
    k = len(rest_idx)
    if k == n:
        return _delta(layout_packed(packed, bits, n, isa=isa), scale, zero, bits, shape, isa, None)
    return _delta(layout_packed(packed, bits, k, rest_idx, n, isa=isa), scale, zero, bits, shape, isa,
                  _salient(rest_idx, n))


def _salient(rest_idx: Tensor, n: int) -> Tensor:
    """The columns of ``n`` that ``rest_idx`` leaves out, ascending."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[rest_idx] = False
    return keep.nonzero().squeeze(1)


def _delta(packed: Tensor, scale: Tensor, zero: Tensor | None, bits: int, shape: tuple[int, int], isa: str,
           salient: Tensor | None) -> LowbitDelta:
    out = shape[0]
    s = scale.float().expand(out).contiguous()
    z = -((1 << bits) - 1) / 2 * s if zero is None else zero.float().expand(out).contiguous()
    return LowbitDelta(packed, s, z.contiguous(), LAYOUT_BITS[bits], shape, isa, salient)


Form = tuple[LowbitDelta, int, int] | tuple[LowbitDelta, int, int, int]  # (delta, start, end[, column])


def sgmv(x: Tensor, y: Tensor, forms: Sequence[Form], isa: str | None = None) -> None:
    """``y[s:t, c:c + out] += x_hat[s:t] @ delta^T`` for each ``(delta, s, t[, c])`` in one call
    (module docstring; ``c`` defaults to 0).

    ``x: float32 [T, in]``, ``y: float32 [T, N]`` (both with unit column stride; ``y`` may be a
    column slice of a wider output). The forms' (rows, columns) regions must not overlap: the
    deltas of different experts take their own rows, the layers of a group (q/k/v) their own
    columns. ``isa``: a build of :data:`ISAS` (None: the best this CPU has). Raises RuntimeError if the
    kernel is unavailable or the forms do not fit ``x`` and ``y``.
    """
    isa, why = choose(isa if isa is not None else "")
    mod = None if isa is None else _build(isa)[0]
    if mod is None:
        raise RuntimeError(f"the low-bit CPU kernel is unavailable: {why}")
    if not forms:
        return
    if y.dtype != torch.float32 or y.dim() != 2 or y.stride(1) != 1:
        raise ValueError(f"y must be float32 [T, out] with unit column stride, got {y.dtype} {tuple(y.shape)}")
    if x.dtype != torch.float32 or x.stride(1) != 1:
        x = x.float().contiguous()
    ds = [f[0] for f in forms]
    mod.sgmv(x, y, [d.packed for d in ds], [d.scale for d in ds], [d.zero for d in ds], [d.bits for d in ds],
             [f[1] for f in forms], [f[2] for f in forms], [f[3] if len(f) > 3 else 0 for f in forms])


def quantize_reference(x: Tensor) -> Tensor:
    """``x: float32 [T, in]`` -> ``x_hat`` as the kernel sees it: int8 per row and group of :data:`GROUP` columns."""
    t, n = x.shape
    kp = -(-n // GROUP) * GROUP
    g = torch.nn.functional.pad(x.float(), (0, kp - n)).view(t, kp // GROUP, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(g * inv).clamp(-128, 127)
    return (q * (amax / 127.0)).view(t, kp)[:, :n]


def sgmv_reference(x: Tensor, y: Tensor, forms: list[tuple[Tensor, Tensor, Tensor, int, int]]) -> None:
    """Plain PyTorch statement of :func:`sgmv`: ``forms`` as ``(codes [out, in], scale [out], zero [out], s, t)``."""
    xh = quantize_reference(x)
    for codes, scale, zero, s, t in forms:
        y[s:t] += xh[s:t] @ (codes.float() * scale[:, None] + zero[:, None]).T
