"""Bits where they matter: choose each matrix's encoding under one global budget.

Each decoder matrix gets one rung of a ladder of encodings (cheapest first, e.g. 1-bit signs with
row/column scales, then 2-bit round-to-nearest). Starting from the cheapest rung everywhere, the
matrix whose next rung buys the largest drop in proxy error per extra byte is upgraded, until the
budget of ``target_bits`` per delta parameter is spent. The proxy is the layer's expected squared
output error on calibration activations, ``sum_i act_sq_i * sum_j (delta_ji - deq_ji)^2``.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from meswitch.compress.codec import encode_delta
from meswitch.deltas import decode_delta

Encoded = tuple[dict[str, Tensor], dict[str, Any]]
Rung = Callable[[Tensor, Tensor | None], Encoded]  # (delta, the layer's statistic) -> encoding

# (label, encoder): cheapest first
LADDER: Sequence[tuple[str, Rung]] = (
    ("sign2d", lambda d, a: encode_delta(d, "sign2d", 1, 0, a)),
    ("rtn2", lambda d, a: encode_delta(d, "rtn", 2, 0, a)),
    ("rtn3", lambda d, a: encode_delta(d, "rtn", 3, 0, a)),
)

# GPTQ codes at 1, 2 and 3 bits; the statistic is the layer's input second moment H: [in, in]
GPTQ_LADDER: Sequence[tuple[str, Rung]] = tuple(
    (f"gptq{b}", lambda d, h, b=b: encode_delta(d, "gptq", b, hessian=h)) for b in (1, 2, 3))


def nbytes(fields: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in fields.values())


def output_error(delta: Tensor, encoded: Encoded, act_sq: Tensor | None) -> float:
    """``sum_i act_sq_i * sum_j (delta_ji - deq_ji)^2``: expected squared output error per token."""
    err = (decode_delta(*encoded) - delta.float()).square().sum(0)
    return float(err @ act_sq.float()) if act_sq is not None else float(err.sum())


def hessian_error(delta: Tensor, encoded: Encoded, stat: Tensor | tuple[Tensor, Tensor] | None) -> float:
    """``tr(E H E^T)`` with ``E = delta - deq``: the same expectation with the full ``H: [in, in]``.

    stat: ``H``, or ``(H, g_sq)`` with ``g_sq: [out]`` the mean squared loss gradient at the layer's
    output (:func:`~meswitch.compress.calib.collect_output_grad_sq`): then ``sum_j g_sq_j (E H E^T)_jj``,
    the error's expected effect on the loss.
    """
    if stat is None:
        return output_error(delta, encoded, None)
    from meswitch.compress.gptq import row_output_error

    hessian, g_sq = stat if isinstance(stat, tuple) else (stat, None)
    per_row = row_output_error(delta, decode_delta(*encoded), hessian)
    return float(per_row.sum() if g_sq is None else per_row @ g_sq.float())


Rungs = list[tuple[Encoded, float, int]]  # per ladder rung: (encoding, proxy error, stored bytes)


def encode_rungs(delta: Tensor, stat: Tensor | None, ladder: Sequence[tuple[str, Rung]] = LADDER,
                 error: Callable[[Tensor, Encoded, Any], float] = output_error, error_stat: Any = None) -> Rungs:
    """Every rung of ``ladder`` for one ``delta: [out, in]``: its encoding (made with ``stat``), the proxy
    ``error`` measured with ``error_stat`` and the stored bytes. What :func:`choose` needs of a matrix."""
    out = []
    for _, enc in ladder:
        e = enc(delta, stat)
        out.append((e, error(delta, e, error_stat), nbytes(e[0])))
    return out


class Spilled(NamedTuple):
    """An encoding's tensors written to disk by :func:`spill` (the ``fields`` slot of an ``Encoded``)."""

    path: Path
    rung: int


def spill(rungs: Rungs, path: Path) -> Rungs:
    """``rungs`` with every encoding's tensors moved to one safetensors file at ``path``.

    A ladder holds every rung of every matrix until the global choice (the full zoo's expert: ~80 MB
    of codes at 1, 2 and 3 bits); on disk, only the chosen rungs come back (:func:`unspill`).
    """
    from safetensors.torch import save_file

    save_file({f"{i}.{k}": t.contiguous() for i, ((fields, _), _, _) in enumerate(rungs) for k, t in fields.items()},
              str(path))
    return [((Spilled(path, i), meta), err, size) for i, ((_, meta), err, size) in enumerate(rungs)]


def unspill(fields: dict[str, Tensor] | Spilled) -> dict[str, Tensor]:
    """The tensors of one encoding, read back if :func:`spill` wrote them."""
    if not isinstance(fields, Spilled):
        return fields
    from safetensors import safe_open

    prefix = f"{fields.rung}."
    with safe_open(str(fields.path), framework="pt") as f:
        names = [k for k in f.keys() if k.startswith(prefix)]  # noqa: SIM118 (a safetensors handle, not a dict)
        return {k[len(prefix):]: f.get_tensor(k).clone() for k in names}  # a copy: the file is not kept mapped


def choose(rungs: dict[str, Rungs], params: int, target_bits: float,
           ladder: Sequence[tuple[str, Rung]] = LADDER) -> dict[str, Encoded]:
    """Pick one rung per matrix so that total bytes <= ``target_bits * params / 8`` (see module docstring).

    rungs: name -> :func:`encode_rungs` of that matrix (or its :func:`spill`); params: the delta parameters of all of them.
    Returns name -> (fields, meta) with ``meta["rung"]`` the ladder label.
    """
    budget = target_bits * params / 8
    level = dict.fromkeys(rungs, 0)
    spent = sum(r[0][2] for r in rungs.values())
    if spent > budget:
        raise ValueError(f"target of {target_bits} bits per parameter is below the cheapest encoding "
                         f"({8 * spent / params:.3f})")

    def gain(name: str) -> tuple[float, str] | None:
        i = level[name]
        if i + 1 >= len(rungs[name]):
            return None
        (_, e0, b0), (_, e1, b1) = rungs[name][i], rungs[name][i + 1]
        return (-(e0 - e1) / max(b1 - b0, 1), name)

    heap = [g for g in (gain(n) for n in rungs) if g is not None]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        i = level[name]
        extra = rungs[name][i + 1][2] - rungs[name][i][2]
        if spent + extra > budget:
            continue  # too big for what is left; a cheaper upgrade elsewhere may still fit
        level[name] = i + 1
        spent += extra
        g = gain(name)
        if g is not None:
            heapq.heappush(heap, g)
    out = {}
    for name, i in level.items():
        fields, meta = rungs[name][i][0]
        out[name] = (unspill(fields), {**meta, "rung": ladder[i][0]})
    return out


def allocate(
    deltas: dict[str, Callable[[], Tensor]],
    act_sq: dict[str, Tensor],
    target_bits: float,
    ladder: Sequence[tuple[str, Rung]] = LADDER,
    error: Callable[[Tensor, Encoded, Tensor | None], float] = output_error,
    error_stats: dict[str, Tensor] | None = None,
    cache: dict[str, list] | None = None,
) -> dict[str, Encoded]:
    """Pick one rung per matrix so that total bits / total parameters <= ``target_bits``.

    deltas: name -> a function returning ``delta: [out, in]`` (called once per matrix; the dense delta
    is dropped after its rungs are encoded). act_sq: name -> the statistic the ladder's rungs and
    ``error`` take (``act_sq: [in]``, or ``H: [in, in]`` for :data:`GPTQ_LADDER` with
    :func:`hessian_error`). error_stats: the statistic ``error`` measures with, when it should come
    from other tokens than the encoding's (default: ``act_sq``). cache: name -> (rungs, params),
    filled here and reused by a later call with the same statistics. Returns name -> (fields, meta).
    """
    from tqdm.auto import tqdm

    rungs: dict[str, Rungs] = {}
    params = 0
    for name, get in tqdm(deltas.items(), desc="encode", unit="layer", dynamic_ncols=True):
        if cache is not None and name in cache:
            rungs[name], n = cache[name]
            params += n
            continue
        d = get()
        params += d.numel()
        a = act_sq.get(name)
        rungs[name] = encode_rungs(d, a, ladder, error, a if error_stats is None else error_stats.get(name))
        if cache is not None:
            cache[name] = (rungs[name], d.numel())
        del d
    return choose(rungs, params, target_bits, ladder)


def describe(choice: dict[str, Encoded]) -> dict[str, int]:
    """How many matrices got each rung."""
    counts: dict[str, int] = {}
    for _, meta in choice.values():
        counts[meta["rung"]] = counts.get(meta["rung"], 0) + 1
    return counts
