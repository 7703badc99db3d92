"""Read a PEFT LoRA adapter directory as an expert: one :class:`~meswitch.deltas.LowRankDelta` per adapted layer.

An adapter directory (PEFT's ``save_pretrained``) holds ``adapter_config.json`` and
``adapter_model.safetensors``, whose keys are ``base_model.model.<module>.lora_A[.<adapter>].weight: [r, in]``
and ``...lora_B[.<adapter>].weight: [out, r]`` for each adapted linear layer ``<module>`` of the base::

    delta = scale * lora_B @ lora_A          # [out, in]
    scale = lora_alpha / r                   # lora_alpha / sqrt(r) with use_rslora

with ``r`` and ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` where a pattern names
it. Weights of ``modules_to_save`` are whole trained copies of base parameters: they are stored as dense
deltas against the base. The factors are stored in 16 bit as they are (bf16 kept, anything else fp16):
no calibration, no quantization.

Everything is checked against the base before anything is returned, and :class:`AdapterError` names
the file and what is wrong. ``peft`` itself is not needed.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meswitch.errors import MeswitchError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model's own module names
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<side>A|B)(?:\.(?P<adapter>[^.]+))?\.weight")
_SAVED_COPY = re.compile(r"\.modules_to_save(?:\.[^.]+)?(?=\.[^.]+$)")  # "<module>.modules_to_save[.<adapter>].weight"


# LoRA variants that are not ``W + scale * B @ A`` on a linear layer for every token: refused by name
_NOT_A_WEIGHT_DELTA = {
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "layer_replication": "the adapter duplicates decoder layers",
    "target_parameters": "the adapter targets bare parameters, not linear layers",
    "kasa_config": "KaSA puts learned singular values between lora_A and lora_B",
    "use_bdlora": "BD-LoRA factors are block-diagonal",
    "monteclora_config": "MonteCLoRA samples its factors",
    "arrow_config": "Arrow routes each token among several adapters",
}


class AdapterError(MeswitchError, ValueError):
    """A PEFT adapter directory that cannot be stored as an expert of this base (names the file and why)."""


def is_adapter(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraConfig:
    """What meswitch reads of ``adapter_config.json``; other keys are ignored."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` of ``module`` (a base module name): the first pattern that names it, else the defaults.

        A pattern key names ``module`` when it matches the whole name or a dot-separated tail of it, as in PEFT.
        """
        r = _pattern(self.rank_pattern, module, self.r)
        return int(r), float(_pattern(self.alpha_pattern, module, self.lora_alpha))

    def scale(self, module: str) -> float:
        """LoRA's ``scaling`` of ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def read_config(path: Path) -> LoraConfig:
    """Read and check ``path`` (an ``adapter_config.json``): :class:`AdapterError` for what meswitch cannot serve."""
    from meswitch.deltas.records import is_finite_number, is_positive_int

    def bad(msg: str) -> AdapterError:
        return AdapterError(f"{path}: {msg}")

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise bad("missing: not a PEFT adapter directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise bad(f"peft_type is {raw.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') can be stored")
    if raw.get("use_dora"):
        raise bad("use_dora is true: a DoRA adapter rescales each column of W_base + B @ A, so its delta is not "
                  "low-rank; only plain LoRA adapters can be stored")
    if raw.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out is true (an adapter for Conv1D layers); the base's layers are nn.Linear")
    if raw.get("lora_bias"):
        raise bad("lora_bias is true: the adapter adds a bias, and the engine applies deltas to weights only")
    for key, why in _NOT_A_WEIGHT_DELTA.items():
        if raw.get(key):
            raise bad(f"{key} is set: {why}; meswitch stores scale * B @ A deltas of linear layers only")
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not is_positive_int(r):
        raise bad(f"r must be a positive integer, got {r!r}")
    if not is_finite_number(alpha):
        raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
    patterns = {}
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        value = raw.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0
                                                  for v in value.values()):
            raise bad(f"{key} must map module names to positive numbers, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise bad(f"{key}: {pattern!r} is not a regular expression: {exc}") from exc
        patterns[key] = value
    saved = raw.get("modules_to_save") or []
    if isinstance(saved, str) or not all(isinstance(m, str) for m in saved):
        raise bad(f"modules_to_save must be a list of module names, got {saved!r}")
    return LoraConfig(r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora")),
                      rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
                      modules_to_save=tuple(saved), base_model_name_or_path=raw.get("base_model_name_or_path"))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (an ``adapter_model.safetensors``), on the CPU."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        pickled = path.with_name("adapter_model.bin")
        hint = (f"; {pickled.name} is a pickle, which meswitch does not load: save the adapter with "
                "save_pretrained(..., safe_serialization=True)") if pickled.exists() else ""
        raise AdapterError(f"{path}: missing{hint}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path}: not a readable safetensors file: {exc}") from exc


def read_adapter(path: Path, base: nn.Module, base_dir: Path | None = None
                 ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]], dict[str, Any]]:
    """The expert that adapter directory ``path`` makes of ``base``: ``(layers, layer_meta, info)`` for
    ``DeltaStore.add_expert``, every layer checked against ``base`` (module docstring).

    ``layers[<module>] = {"lora_a", "lora_b"}`` (a :class:`~meswitch.deltas.LowRankDelta`'s fields) per
    adapted linear layer; ``layers[<parameter>] = {"delta"}`` (dense) per changed ``modules_to_save`` weight.
    ``info``: method ``lora``, ranks, bytes and bits per delta parameter, the 16-bit rounding of the
    factors, and ``warnings`` (e.g. ``base_model_name_or_path`` naming another model than ``base_dir``).
    """
    import torch

    from meswitch.deltas import DenseDelta, LowRankDelta

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"{path}: no such adapter directory")
    cfg = read_config(path / ADAPTER_CONFIG)
    weights = path / ADAPTER_WEIGHTS
    tensors = read_tensors(weights)
    factors, copies = split_keys(weights, tensors)
    if not factors and not copies:
        raise AdapterError(f"{weights}: holds no LoRA weights")
    modules = dict(base.named_modules())
    layers: dict[str, dict[str, torch.Tensor]] = {}
    meta: dict[str, dict[str, Any]] = {}
    ranks: dict[str, int] = {}
    worst = 0.0  # largest rounding to 16 bit, relative to the largest factor value
    for module, pair in sorted(factors.items()):
        a, b = _checked_pair(weights, module, pair, modules.get(module))
        r, _ = cfg.rank_and_alpha(module)
        if a.shape[0] != r:
            raise AdapterError(f"{weights}: {module}: lora_A has rank {a.shape[0]}, but {ADAPTER_CONFIG} gives "
                               f"r={r} for it (r or rank_pattern)")
        record = LowRankDelta(a, b, cfg.scale(module))
        stored = record.fields()
        for name, orig in (("lora_a", a), ("lora_b", b)):
            half = stored[name].float()
            if not torch.isfinite(half).all():
                raise AdapterError(f"{weights}: {module}: {name} has values that are not finite in 16 bit")
            top = orig.float().abs().max().item()
            worst = max(worst, (half - orig.float()).abs().max().item() / top if top else 0.0)
        layers[module], meta[module], ranks[module] = stored, record.meta(), r
    dense = _dense_deltas(weights, copies, base)
    for name, d in dense.items():
        layers[name], meta[name] = DenseDelta(d).fields(), DenseDelta(d).meta()
    warnings = _base_warnings(cfg, base, base_dir)
    for w in warnings:
        log.warning("%s", w)
    return layers, meta, _info(path, cfg, base, layers, ranks, sorted(dense), worst, warnings)


def split_keys(weights: Path, tensors: dict[str, torch.Tensor]
                ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``({module: {"A": lora_A, "B": lora_B}}, {base parameter: trained copy})`` from the file's keys."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, torch.Tensor] = {}
    adapters = set()
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise AdapterError(f"{weights}: tensor {key!r} does not start with {PREFIX!r} (not saved by PEFT?)")
        rest = key[len(PREFIX):]
        m = _LORA_KEY.fullmatch(rest)
        if m:
            factors.setdefault(m["module"], {})[m["side"]] = t
            adapters.add(m["adapter"])
        elif ".lora_embedding_" in rest:
            raise AdapterError(f"{weights}: tensor {key!r}: LoRA on an embedding is not supported; the engine "
                               "applies low-rank deltas to the linear layers of the decoder blocks only")
        elif ".lora_" in rest or "lora_magnitude_vector" in rest:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA factor meswitch can serve (only "
                               "lora_A/lora_B weights of linear layers)")
        else:
            copies[_SAVED_COPY.sub("", rest)] = t
    if len(adapters) > 1:
        raise AdapterError(f"{weights}: holds several adapters {sorted(a or '(unnamed)' for a in adapters)}; "
                           "store each as its own expert")
    return factors, copies


def _checked_pair(weights: Path, module: str, pair: dict[str, torch.Tensor], mod: object
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A: [r, in], lora_B: [out, r])`` of ``module``, checked against the base's module ``mod``."""
    from torch import nn

    if set(pair) != {"A", "B"}:
        side = "lora_A" if "A" in pair else "lora_B"
        raise AdapterError(f"{weights}: {module}: has {side} without its pair")
    if mod is None:
        raise AdapterError(f"{weights}: {module}: the base has no such module (an adapter for another base?)")
    if not isinstance(mod, nn.Linear):
        what = "an embedding" if isinstance(mod, nn.Embedding) else f"a {type(mod).__name__}, not a linear layer"
        raise AdapterError(f"{weights}: {module}: is {what} of the base; the engine applies low-rank deltas to "
                           "the linear layers of the decoder blocks only")
    if ".layers." not in module:
        raise AdapterError(f"{weights}: {module}: is a linear layer outside the decoder blocks (not under "
                           "'.layers.'); the engine applies low-rank deltas to the decoder blocks' layers only")
    a, b = pair["A"], pair["B"]
    out, n = mod.out_features, mod.in_features
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n or b.shape[0] != out or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{weights}: {module}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, but the "
                           f"base weight is [{out}, {n}] (expected [r, {n}] and [{out}, r]: an adapter for another "
                           "base?)")
    for side, t in (("lora_A", a), ("lora_B", b)):
        if not t.is_floating_point():
            raise AdapterError(f"{weights}: {module}: {side} is {t.dtype}, expected floating point")
    return a, b


def _dense_deltas(weights: Path, copies: dict[str, torch.Tensor], base: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter: copy - base}`` for every trained copy (``modules_to_save``) that differs from the base."""
    import torch

    params = dict(base.named_parameters(remove_duplicate=False))
    tied = bool(getattr(getattr(base, "config", None), "tie_word_embeddings", False))
    out = {}
    for name, t in sorted(copies.items()):
        if name not in params:
            raise AdapterError(f"{weights}: tensor for {name!r} (modules_to_save): the base has no such parameter")
        if not name.endswith(".weight") or not _servable_owner(base, name.removesuffix(".weight")):
            raise AdapterError(f"{weights}: {name!r} (modules_to_save): the engine applies deltas to the weights "
                               "of linear layers, embeddings and norms only")
        if tied and name in ("lm_head.weight", "model.embed_tokens.weight"):
            raise AdapterError(f"{weights}: {name!r} (modules_to_save): the base ties its embeddings and output "
                               "head, and a trained copy of one of them unties them, which the engine cannot serve")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{weights}: {name!r} (modules_to_save) is {list(t.shape)}, the base's "
                               f"{list(p.shape)} (an adapter for another base?)")
        d = t.detach().float() - p.detach().float()
        if not torch.isfinite(d).all():
            raise AdapterError(f"{weights}: {name!r} (modules_to_save) has non-finite values")
        if torch.count_nonzero(d):
            out[name] = d
    return out


def _servable_owner(base: nn.Module, owner: str) -> bool:
    from torch import nn

    mod = dict(base.named_modules()).get(owner)
    return isinstance(mod, (nn.Linear, nn.Embedding)) or "norm" in type(mod).__name__.lower()


def _base_warnings(cfg: LoraConfig, base: nn.Module, base_dir: Path | None) -> list[str]:
    """A warning when ``base_model_name_or_path`` names another model: only by its last path part, since
    the same model lives at different paths (the shapes, checked above, are what refuses an adapter)."""
    named = (cfg.base_model_name_or_path or "").rstrip("/")
    if not named:
        return []
    ours = {Path(str(p)).name for p in (base_dir and Path(base_dir).resolve(),
                                         getattr(getattr(base, "config", None), "_name_or_path", None)) if p}
    if Path(named).name in ours:
        return []
    return [f"the adapter was trained on {named!r}; the base is {sorted(ours) or 'unnamed'} (only the shapes are "
            "checked: make sure it is the same model)"]


def _info(path: Path, cfg: LoraConfig, base: nn.Module, layers: dict[str, dict[str, torch.Tensor]],
          ranks: dict[str, int], dense: list[str], rounding: float, warnings: list[str]) -> dict[str, Any]:
    """What the store records of the expert, in the keys ``compress_model``'s info uses where they mean the same."""
    from meswitch.compress.calib import linear_names

    modules = dict(base.named_modules())
    delta_params = sum(modules[n].weight.numel() for n in linear_names(base))  # as compress counts bits
    lora_bytes = sum(t.nbytes for n in ranks for t in layers[n].values())
    all_bytes = sum(t.nbytes for f in layers.values() for t in f.values())
    n_params = sum(p.numel() for p in base.parameters())  # tied weights once
    rank = max(ranks.values(), default=0)
    return {
        "method": "lora",
        "config": {"method": "lora", "bits": 16, "rank": rank, "lora_alpha": cfg.lora_alpha,
                   "use_rslora": cfg.use_rslora},
        "rank": rank,
        "ranks": sorted(set(ranks.values())),
        "adapted_layers": len(ranks),
        "adapted_params": sum(modules[n].weight.numel() for n in ranks),
        "bits_per_param": 8 * lora_bytes / delta_params if delta_params else None,
        "delta_params": delta_params,
        "bytes": all_bytes,
        "fp16_expert_bytes": 2 * n_params,
        "ratio_vs_fp16": 2 * n_params / all_bytes if all_bytes else None,
        "dense": dense,
        "rounding_16bit": rounding,
        "adapter_path": str(path.resolve()),
        "base_model_name_or_path": cfg.base_model_name_or_path,
        "warnings": warnings,
    }
