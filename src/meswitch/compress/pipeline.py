"""Compress one expert against its base: calibrate, encode each layer, distil, apply the deltas.

What the result is worth is measured by the caller on :func:`held_out_batches` (the job
``meswitch.jobs.compress_store`` does, before it adds the expert to a store).

Policy for the weights that are not decoder linear layers (documented in docs/compression.md):
norms and any other changed tensor are stored as a ``dense`` fp16 delta (counted in the size);
tensors identical to the base (in the reference zoo: the tied embeddings / lm_head, frozen at
fine-tuning) are not stored and are listed under ``unchanged``.
"""

from __future__ import annotations

import random
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from meswitch.compress.calib import (
    collect_act_sq,
    collect_hessians,
    collect_output_grad_sq,
    hessians_by_block,
    linear_names,
)
from meswitch.compress.codec import encode_delta, layer_bits
from meswitch.compress.config import CompressConfig
from meswitch.data.chat import pack_blocks
from meswitch.data.examples import Example
from meswitch.errors import MeswitchError
from meswitch.utils.memory import trim_heap

GPTQ_METHODS = ("gptq", "gptq-mixed")  # need the input second moments (expert_hessians)
ACT_SQ_METHODS = ("salient", "sign2d", "mixed")  # need the per-channel activation statistics


class ArchitectureMismatchError(MeswitchError):
    """Base and expert differ in architecture, parameter names or shapes."""


def salient_k(cfg: CompressConfig, out_features: int, in_features: int) -> int:
    from meswitch.compress.salient import budget_k

    if cfg.method not in ("salient", "sign2d"):
        return 0
    if cfg.salient is None:
        # sign2d also stores one fp16 scale per input column: about 16 / out bits per parameter
        target = cfg.budget - (16 / out_features if cfg.method == "sign2d" else 0.0)
        bits = 1 if cfg.method == "sign2d" else cfg.bits
        return budget_k(out_features=out_features, in_features=in_features, bits=bits,
                        target_bits=target, symmetric=cfg.symmetric or cfg.method == "sign2d")
    if 0 < cfg.salient < 1:
        return max(1, round(cfg.salient * in_features))
    return min(int(cfg.salient), in_features)


def check_compatible(base: dict[str, torch.Tensor], expert: dict[str, torch.Tensor], base_arch: str,
                     expert_arch: str) -> None:
    """Raise ArchitectureMismatchError naming the first difference between two state dicts."""
    if base_arch != expert_arch:
        raise ArchitectureMismatchError(f"base is {base_arch}, expert is {expert_arch}")
    missing = sorted(set(base) ^ set(expert))
    if missing:
        side = "expert" if missing[0] in base else "base"
        raise ArchitectureMismatchError(f"tensor {missing[0]!r} is missing from the {side} "
                                        f"({len(missing)} names differ)")
    for name, t in base.items():
        if t.shape != expert[name].shape:
            raise ArchitectureMismatchError(
                f"tensor {name!r}: base {list(t.shape)}, expert {list(expert[name].shape)}")


def _blocks(examples: list[Example], tok: Any, cfg: CompressConfig, extra: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``[calib_blocks | eval_blocks | up to extra more]`` blocks of ``calib_len`` tokens: ids and masks."""
    shuffled = list(examples)
    random.Random(0).shuffle(shuffled)  # calibration files are often sorted by domain
    ids, mask = pack_blocks(shuffled, tok, cfg.calib_len, max_example_len=cfg.calib_len * 2)
    need = cfg.calib_blocks + cfg.eval_blocks
    if len(ids) < need:
        raise MeswitchError(f"calibration text gives {len(ids)} blocks of {cfg.calib_len} tokens; need {need}")
    return ids[: need + extra], mask[: need + extra]


def held_out_batches(tok: Any, calib: list[Example], cfg: CompressConfig
                     ) -> list[tuple[torch.Tensor, torch.Tensor, None]]:
    """The ``cfg.eval_blocks`` calibration blocks :func:`compress_model` never learns from, one per batch:
    ``(ids [1, calib_len], mask [1, calib_len], None)`` for ``meswitch.eval.fidelity.compare_models``."""
    ids, mask = _blocks(calib, tok, cfg)
    return [(ids[i : i + 1], mask[i : i + 1], None) for i in range(cfg.calib_blocks, len(ids))]


def _hessian_pool(tok: Any, calib: list[Example], cfg: CompressConfig) -> torch.Tensor:
    """``[N, calib_len]`` token ids GPTQ's statistics are taken over: the calibration blocks and up to
    ``cfg.hessian_blocks`` more, never the blocks kept for the stored fidelity."""
    ids, _ = _blocks(calib, tok, cfg, extra=cfg.hessian_blocks)
    return torch.cat([ids[: cfg.calib_blocks], ids[cfg.calib_blocks + cfg.eval_blocks :]])


class Hessians(NamedTuple):
    """Input second moments per layer (``{name: [in, in]}``): ``fit`` chooses the GPTQ codes,
    ``val`` (other calibration tokens) measures the output error the bit allocation compares, each
    layer's rows weighted by ``g_sq`` (``{name: [out]}``, the loss gradient's second moment)."""

    fit: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    g_sq: dict[str, torch.Tensor]

    def allocation_stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (H_val, g_sq)}`` for :func:`~meswitch.compress.allocate.hessian_error`."""
        return {n: (h, self.g_sq[n]) for n, h in self.val.items()}


def expert_hessians(expert: torch.nn.Module, tok: Any, calib: list[Example], cfg: CompressConfig,
                    allocation: bool = True) -> Hessians:
    """The :class:`Hessians` :func:`compress_model` would collect for a GPTQ ``cfg``.

    Taken over the calibration blocks plus up to ``cfg.hessian_blocks`` more (never the blocks kept
    for the stored fidelity); for a bit ``allocation`` a quarter of them (at least one) is held out
    as ``val`` and ``g_sq`` is measured on it; without, ``fit`` takes every block and the rest is empty.
    """
    pool = _hessian_pool(tok, calib, cfg)
    names = linear_names(expert)
    if not allocation:
        return Hessians(collect_hessians(expert, pool.split(4), names), {}, {})
    n_val = max(1, len(pool) // 4)
    return Hessians(collect_hessians(expert, pool[:-n_val].split(4), names),
                    collect_hessians(expert, pool[-n_val:].split(4), names),
                    collect_output_grad_sq(expert, pool[-n_val:].split(2), names))


def gptq_by_block(expert: torch.nn.Module, tok: Any, calib: list[Example], cfg: CompressConfig,
                  deltas: Mapping[str, Callable[[], torch.Tensor]], rung_cache: dict | None = None
                  ) -> dict[str, tuple[dict, dict]]:
    """What :func:`compress_model` encodes for a GPTQ ``cfg`` with :func:`expert_hessians`' statistics,
    holding one decoder block's input second moments at a time instead of every layer's.

    deltas: name -> a function returning ``delta: [out, in]``, in ``linear_names`` order. ``gptq``:
    each layer is encoded as soon as its block's ``H`` exists. ``gptq-mixed``: each layer's GPTQ
    ladder (every rung's encoding, held-out error and bytes; kept in ``rung_cache``) is built as soon
    as its block's ``H`` (fit and val) exists; then one global choice within ``cfg.budget``.
    Returns name -> (fields, meta).
    """
    mixed = cfg.method == "gptq-mixed"
    if mixed and rung_cache is None:  # nowhere to keep the ladder: its encodings wait on disk for the choice
        with tempfile.TemporaryDirectory(prefix="meswitch-ladder-") as tmp:
            return _gptq_walk(expert, tok, calib, cfg, deltas, {}, Path(tmp))
    return _gptq_walk(expert, tok, calib, cfg, deltas, rung_cache if mixed and rung_cache is not None else {}, None)


def _gptq_walk(expert: torch.nn.Module, tok: Any, calib: list[Example], cfg: CompressConfig,
               deltas: Mapping[str, Callable[[], torch.Tensor]], cache: dict, spill_dir: Path | None
               ) -> dict[str, tuple[dict, dict]]:
    """:func:`gptq_by_block`'s walk over the decoder blocks; ``gptq-mixed`` ladders go to ``cache``,
    their encodings spilled to files in ``spill_dir`` if given."""
    from tqdm.auto import tqdm

    from meswitch.compress.allocate import GPTQ_LADDER, choose, encode_rungs, hessian_error, spill

    names = list(deltas)
    mixed = cfg.method == "gptq-mixed"
    if mixed and all(n in cache for n in names):  # statistics not needed: every ladder is known
        return choose({n: cache[n][0] for n in names}, sum(cache[n][1] for n in names), cfg.budget, GPTQ_LADDER)
    pool = _hessian_pool(tok, calib, cfg)
    n_val = max(1, len(pool) // 4) if mixed else 0
    sets = [pool[: len(pool) - n_val].split(4), *([pool[-n_val:].split(4)] if mixed else [])]
    g_sq = collect_output_grad_sq(expert, pool[-n_val:].split(2), names) if mixed else {}
    trim_heap()
    out: dict[str, tuple[dict, dict]] = {}
    bar = tqdm(total=len(names), desc="encode", unit="layer", dynamic_ncols=True)
    for inside, hs in hessians_by_block(expert, sets, names):
        for name in inside:
            if name not in cache:
                d = deltas[name]()
                if mixed:
                    rungs = encode_rungs(d, hs[0][name], GPTQ_LADDER, hessian_error, (hs[1][name], g_sq[name]))
                    if spill_dir is not None:
                        rungs = spill(rungs, spill_dir / f"{len(cache)}.safetensors")
                    cache[name] = (rungs, d.numel())
                else:
                    out[name] = encode_delta(d, "gptq", cfg.bits, hessian=hs[0][name])
                del d
            bar.update()
        del hs  # this block's matrices go before the next block's are made
        trim_heap()  # and the pages of its transient tensors go back to the OS
    bar.close()
    if not mixed:
        return out
    return choose({n: cache[n][0] for n in names}, sum(cache[n][1] for n in names), cfg.budget, GPTQ_LADDER)


def compress_model(base: torch.nn.Module, expert: torch.nn.Module, tok: Any, calib: list[Example],
                   cfg: CompressConfig, act_sq: dict[str, torch.Tensor] | None = None,
                   hessians: Hessians | None = None, rung_cache: dict | None = None
                   ) -> tuple[dict, dict, dict[str, Any]]:
    """Compress ``expert`` against ``base`` (both fp32 HF models).

    ``base`` is modified in place: it ends as base + the deltas as stored (distilled step sizes
    included), the model whose fidelity to ``expert`` the caller measures on :func:`held_out_batches`.
    act_sq, hessians: calibration statistics from :func:`expert_act_sq` and :func:`expert_hessians`
    to reuse across settings (else computed when the method needs them); rung_cache: a dict kept
    across ``gptq-mixed`` runs of one expert with the same statistics, so its encodings are reused.
    Returns (layers, layer_meta, info): what ``DeltaStore.add_expert`` takes, ``info`` without fidelity.
    """
    from tqdm.auto import tqdm

    from meswitch.deltas.apply import apply_delta

    t0 = time.perf_counter()
    b_state, e_state = base.state_dict(), expert.state_dict()
    check_compatible(b_state, e_state, type(base).__name__, type(expert).__name__)
    ids, mask = _blocks(calib, tok, cfg)
    cal_ids, cal_mask = ids[: cfg.calib_blocks], mask[: cfg.calib_blocks]
    names = linear_names(expert)
    if act_sq is None:
        act_sq = collect_act_sq(expert, cal_ids.split(4), names) if cfg.method in ACT_SQ_METHODS else {}
    hessians = hessians or Hessians({}, {}, {})

    layers: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict[str, Any]] = {}
    getters = {n: (lambda w=f"{n}.weight": e_state[w] - b_state[w]) for n in names}
    if cfg.method in GPTQ_METHODS and not hessians.fit:  # statistics streamed, one block at a time
        for name, (fields, m) in gptq_by_block(expert, tok, calib, cfg, getters, rung_cache).items():
            layers[name], meta[name] = fields, m
    elif cfg.method in ("mixed", "gptq-mixed"):
        from meswitch.compress.allocate import GPTQ_LADDER, LADDER, allocate, hessian_error, output_error

        ladder, stats, error, error_stats = ((GPTQ_LADDER, hessians.fit, hessian_error,
                                              hessians.allocation_stats())
                                             if cfg.method == "gptq-mixed" else (LADDER, act_sq, output_error, None))
        for name, (fields, m) in allocate(getters, stats, cfg.budget, ladder, error, error_stats,
                                              rung_cache if cfg.method == "gptq-mixed" else None).items():
            layers[name], meta[name] = fields, m
    else:
        for name in tqdm(names, desc="encode", unit="layer", dynamic_ncols=True):
            w = f"{name}.weight"
            delta = e_state[w] - b_state[w]  # one layer at a time: the dense delta is freed after encoding
            if cfg.method == "lowrank":  # truncated SVD: no calibration statistics (codec.lowrank_delta)
                layers[name], meta[name] = encode_delta(delta, "lowrank", cfg.layer_rank(*delta.shape, layer=name))
                continue
            k = salient_k(cfg, *delta.shape)
            layers[name], meta[name] = encode_delta(delta, cfg.method, cfg.bits, k, act_sq.get(name),
                                                    cfg.symmetric, cfg.clip, hessians.fit.get(name))
    trim_heap()  # the encodings not chosen (allocation's ladder) were many small tensors
    linear_weights = {f"{n}.weight" for n in names}
    unchanged = []
    stored: set[int] = set()  # tied tensors (embeddings = lm_head) appear under two names: store once
    for pname, t in e_state.items():
        if pname in linear_weights or t.data_ptr() in stored:
            continue
        stored.add(t.data_ptr())
        if torch.equal(t, b_state[pname]):  # compared in place: the embeddings' delta would be ~0.1 GB
            unchanged.append(pname)
        else:
            layers[pname] = {"delta": (t - b_state[pname]).to(torch.float16)}
            meta[pname] = {"method": "dense", "bits": 16, "shape": list(t.shape), "salient": 0}

    dense = {n for n, m in meta.items() if m["method"] == "dense"}
    apply_delta(base, {n: layers[n] for n in dense}, {n: meta[n] for n in dense})
    distill_losses: list[float] = []
    if cfg.steps > 0:
        from meswitch.compress.distill import tune_grids

        distill_losses = tune_grids(base, expert, layers, meta, cal_ids, cal_mask, cfg.steps,
                                    cfg.distill_lr)
        trim_heap()
    quantized = [n for n in meta if n not in dense]
    apply_delta(base, {n: layers[n] for n in quantized}, {n: meta[n] for n in quantized})
    compress_s = time.perf_counter() - t0

    lin_bytes = sum(sum(t.numel() * t.element_size() for t in layers[n].values()) for n in names)
    lin_params = sum(e_state[f"{n}.weight"].numel() for n in names)
    all_bytes = sum(t.numel() * t.element_size() for f in layers.values() for t in f.values())
    n_params = sum(t.numel() for n, t in e_state.items() if n != "lm_head.weight" or not base.config.tie_word_embeddings)
    info = {
        "config": {**asdict(cfg), "clip": cfg.clip, "budget": cfg.budget, "steps": cfg.steps},
        "bits_per_param": 8 * lin_bytes / lin_params,
        "delta_params": lin_params,
        "bytes": all_bytes,
        "fp16_expert_bytes": 2 * n_params,
        "ratio_vs_fp16": 2 * n_params / all_bytes,
        "unchanged": unchanged,
        "distill_losses": distill_losses[:: max(1, len(distill_losses) // 50)],
        "compress_s": round(compress_s, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "layer_bits": {n: round(layer_bits(layers[n], meta[n]), 4) for n in names[:7]},
    }
    return layers, meta, info


def expert_act_sq(expert: torch.nn.Module, tok: Any, calib: list[Example], cfg: CompressConfig
                  ) -> dict[str, torch.Tensor]:
    """The per-channel activation statistics :func:`compress_model` would collect for ``cfg``."""
    ids, _ = _blocks(calib, tok, cfg)
    return collect_act_sq(expert, ids[: cfg.calib_blocks].split(4), linear_names(expert))
