"""The base model served from a GGUF file's own blocks: the shipped model at its shipped precision.

A base checkpoint made from a GGUF file (the packaged SmolLM2-135M-Instruct Q4_1, say) holds the
file's weights dequantized to float32: eight times the bytes of the blocks they came from, read on
every decode step. :func:`attach_gguf_base` finds, for every linear layer of a
:class:`~meswitch.engine.model.ServingModel` (and its token embedding), the GGUF tensor of the same
Hugging Face name, and where the tensor's type has a kernel (:data:`~meswitch.model.gguf_blocks.KERNEL_TYPES`)
and its dequantized weight equals the checkpoint's bit for bit, serves that layer from the blocks:

    BlockLinear(x) = x @ dequantize(blocks)^T + b        # x: float32 [T, in] -> [T, out]
    BlockEmbedding(ids) = dequantize(blocks[ids])        # ids: int64 [T] -> [T, D]

(:mod:`meswitch.engine.kernels.ggml_cpu`, float arithmetic: equal to the checkpoint's matmul up to the
order of the float32 sums). A layer whose tensor is missing, of a type with no kernel (the K-quants),
or different from the checkpoint's weight (a fine-tuned base) keeps its float32 weight, and
:class:`BaseWeights` says which and why. Expert deltas are untouched: they were computed against the
same dequantized weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from meswitch.engine.kernels import ggml_cpu
from meswitch.model.checkpoint import packaged_gguf_if_installed
from meswitch.model.gguf_blocks import read_blocks, read_header

if TYPE_CHECKING:
    from meswitch.engine.model import ServingModel

BASE_WEIGHTS = ("auto", "gguf", "dense")  # EngineConfig.base_weights


class BaseWeightsError(ValueError):
    """``base_weights="gguf"`` was asked for and the base cannot be served from the GGUF file (says why)."""


class BlockLinear(nn.Module):
    """A base linear layer whose weight is ggml blocks: ``forward(x: float32 [T, in]) -> [T, out]``
    ``= x @ W^T + b``, ``W = dequantize(blocks)`` (``blocks: uint8 [out, in / 32 * block_bytes]``).
    ``bias``: the checkpoint's bias parameter itself (None: none)."""

    def __init__(self, blocks: Tensor, type: str, shape: tuple[int, int], bias: Tensor | None = None,
                 isa: str | None = None) -> None:
        super().__init__()
        self.blocks, self.type, self.isa = blocks, type, isa
        self.out_features, self.in_features = shape
        self.bias = bias

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        y = ggml_cpu.linear(x, self.blocks, self.type, self.out_features, isa=self.isa)
        return y if self.bias is None else y.add_(self.bias)

    def dense(self) -> Tensor:
        """``float32 [out, in]``: the weight the blocks hold."""
        return ggml_cpu.dequantize(self.blocks, self.type, self.out_features, isa=self.isa)

    @staticmethod
    def stack(layers: Sequence[BlockLinear]) -> BlockLinear | None:
        """One :class:`BlockLinear` whose output rows are ``layers``' in order (q, k, v), the layers' blocks (and
        biases) becoming row views of it; None when their types, inputs or biases differ."""
        first = layers[0]
        has_bias = [m.bias is not None for m in layers]
        if any(m.type != first.type or m.in_features != first.in_features for m in layers) or \
                any(has_bias) != all(has_bias):
            return None
        widths = [m.out_features for m in layers]
        blocks = torch.cat([m.blocks for m in layers])
        bias = torch.cat([m.bias.detach() for m in layers]) if all(has_bias) else None  # type: ignore[union-attr]
        for j, m in enumerate(layers):
            m.blocks = blocks[sum(widths[:j]) : sum(widths[: j + 1])]  # whole rows: contiguous
            if bias is not None:
                m.bias.data = bias[sum(widths[:j]) : sum(widths[: j + 1])]  # type: ignore[union-attr]
        return BlockLinear(blocks, first.type, (sum(widths), first.in_features), bias, first.isa)


class BlockEmbedding(nn.Module):
    """A token embedding whose table is ggml blocks: ``forward(ids: int64 [T]) -> float32 [T, D]``, the
    dequantized rows ``ids`` of ``blocks: uint8 [V, D / 32 * block_bytes]``."""

    def __init__(self, blocks: Tensor, type: str, shape: tuple[int, int], isa: str | None = None) -> None:
        super().__init__()
        self.blocks, self.type, self.isa = blocks, type, isa
        self.num_embeddings, self.embedding_dim = shape

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, ids: Tensor) -> Tensor:
        rows = self.blocks.index_select(0, ids.reshape(-1))
        return ggml_cpu.dequantize(rows, self.type, rows.shape[0], isa=self.isa).view(*ids.shape, -1)


def dense_weight(base: nn.Module) -> Tensor:
    """A base linear layer's weight as a float tensor ``[out, in]``: its own, or its blocks dequantized."""
    return base.dense() if isinstance(base, BlockLinear) else base.weight.detach()


@dataclass
class BaseWeights:
    """How the served base holds its weights: ``source`` the GGUF file read (None: the checkpoint's dense
    weights only); ``tensors`` Hugging Face parameter name -> ggml type served from blocks; ``dense`` the
    parameters kept as loaded; ``bytes`` what the base's parameters take in memory (shared tensors once);
    ``dense_bytes`` what they took as loaded; ``notes`` why a layer kept its dense weight, or why the
    file was not used at all."""

    mode: str
    source: str | None = None
    tensors: dict[str, str] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    bytes: int = 0
    dense_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        mib = 2**20
        if not self.tensors:
            why = f" ({'; '.join(self.notes[:3])})" if self.notes else ""
            return f"base weights: dense, {self.bytes / mib:.0f} MiB{why}"
        types = sorted(set(self.tensors.values()))
        return (f"base weights: {len(self.tensors)} tensors as {'/'.join(types)} blocks of {self.source}, "
                f"{len(self.dense)} dense; {self.bytes / mib:.0f} MiB (dense: {self.dense_bytes / mib:.0f} MiB)")

    def as_dict(self) -> dict[str, Any]:
        types: dict[str, int] = {}
        for t in self.tensors.values():
            types[t] = types.get(t, 0) + 1
        return {"mode": self.mode, "source": self.source, "block_tensors": types, "dense_tensors": len(self.dense),
                "bytes": self.bytes, "dense_bytes": self.dense_bytes, "notes": list(self.notes)}


def _tensor_bytes(tensors: Sequence[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _model_bytes(model: ServingModel) -> int:
    """Bytes of the serving model's base parameters (every tensor storage counted once)."""
    tensors: list[Tensor] = []
    for _, lin in model.linears():
        b = lin.base
        tensors.append(b.blocks if isinstance(b, BlockLinear) else b.weight)
        if b.bias is not None:
            tensors.append(b.bias)
    e = model.embed.base
    tensors.append(e.blocks if isinstance(e, BlockEmbedding) else e.weight)
    tensors += [norm.weight for _, norm in model.norms()]
    return _tensor_bytes(tensors)


def attach_gguf_base(model: ServingModel, mode: str = "auto", gguf: str | os.PathLike | None = None,
                     isa: str | None = None) -> BaseWeights:
    """Serve ``model``'s base from a GGUF file's blocks where they equal its weights (module docstring).

    ``mode``: ``"dense"`` leaves the model as it is; ``"auto"`` uses ``gguf`` (default: the packaged
    SmolLM2 file) when the model is float32 on a CPU, the file declares the model's architecture,
    hidden size and vocabulary, and the GGML kernel builds here, else stays dense and says why;
    ``"gguf"`` is ``"auto"`` that raises :class:`BaseWeightsError` instead of staying dense, and when not a
    single tensor could be taken. Returns what the base holds now.
    """
    if mode not in BASE_WEIGHTS:
        raise BaseWeightsError(f"base_weights must be one of {list(BASE_WEIGHTS)}, got {mode!r}")
    report = BaseWeights(mode)
    report.bytes = report.dense_bytes = _model_bytes(model)
    if mode == "dense":
        return report

    def refuse(why: str) -> BaseWeights:
        if mode == "gguf":
            raise BaseWeightsError(f"cannot serve the base from GGUF blocks: {why}")
        report.notes.append(why)
        return report

    if model.dtype != torch.float32 or model.device.type != "cpu":
        return refuse(f"the base is {str(model.dtype).removeprefix('torch.')} on {model.device.type}; GGUF blocks "
                      "are served to a float32 model on a CPU")
    path = Path(gguf) if gguf is not None else packaged_gguf_if_installed()
    if path is None:
        return refuse("no GGUF file given (base_gguf) and the packaged one is not installed")
    if not path.is_file():
        return refuse(f"{path}: no such GGUF file")
    cfg = model.config
    try:
        head = read_header(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported, not fatal in auto mode
        return refuse(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})")
    want = {"hidden": getattr(cfg, "hidden_size", None), "vocab": getattr(cfg, "vocab_size", None)}
    if any(head[k] != v for k, v in want.items()):
        return refuse(f"{path.name} is a {head['arch']} model of hidden size {head['hidden']} and vocabulary "
                      f"{head['vocab']}, the base {cfg.model_type} of {want['hidden']} and {want['vocab']}")
    if head["layers"] is not None and head["layers"] < len(model.layers):
        return refuse(f"{path.name} has {head['layers']} layers, the base {len(model.layers)}")
    chosen, why = ggml_cpu.choose(isa or "")
    if chosen is None:
        return refuse(f"the GGML CPU kernel does not build here ({why}); its PyTorch reference would be slower "
                      "than the dense weights")
    _swap(model, path, report, chosen)
    if not report.tensors:
        return refuse(f"{path.name}: no tensor holds this base's weights ({'; '.join(report.notes[:3])})")
    report.source = str(path)
    report.bytes = _model_bytes(model)
    return report


def _swap(model: ServingModel, path: Path, report: BaseWeights, isa: str) -> None:
    """Replace every linear base (and the embedding) of ``model`` whose GGUF tensor equals it; restack."""
    linears = {f"{name}.weight": lin for name, lin in model.linears()}
    embed_name = "model.embed_tokens.weight"
    blocks = read_blocks(path, [*linears, embed_name])  # a tied head and the embedding share one tensor
    equal: set[int] = set()  # ids of dense weights already found equal to their blocks (the tied pair once)

    def take(name: str, weight: Tensor) -> Any:
        t = blocks.get(name)
        if t is None:
            report.notes.append(f"{name}: not in {path.name}")
            return None
        if not t.has_kernel:
            report.notes.append(f"{name}: {t.type} has no kernel; served dense")
            return None
        if tuple(weight.shape) != t.shape:
            report.notes.append(f"{name}: {list(t.shape)} in {path.name}, {list(weight.shape)} in the base")
            return None
        if id(weight) not in equal:
            if not torch.equal(ggml_cpu.dequantize(t.blocks, t.type, t.shape[0], isa=isa), weight.detach()):
                report.notes.append(f"{name}: differs from {path.name} (a fine-tuned or other base); served dense")
                return None
            equal.add(id(weight))
        return t

    for name, lin in linears.items():
        if not isinstance(lin.base, nn.Linear):
            continue
        t = take(name, lin.base.weight)
        if t is None:
            report.dense.append(name)
            continue
        lin.base = BlockLinear(t.blocks, t.type, t.shape, lin.base.bias, isa)
        report.tensors[name] = t.type
    emb = model.embed.base
    if isinstance(emb, nn.Embedding):
        t = take(embed_name, emb.weight)
        if t is None:
            report.dense.append(embed_name)
        else:
            model.embed.base = BlockEmbedding(t.blocks, t.type, t.shape, isa)
            report.tensors[embed_name] = t.type
    for layer in model.layers:
        layer.restack()
