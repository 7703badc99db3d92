"""The base at its own precision: GGUF blocks read under Hugging Face names, and the Q4_1 / Q8_0 kernels.

Three claims, each against an independent statement: the reader's blocks, dequantized by the
reference (:func:`ggml_cpu.dequantize`), are bit for bit the weights transformers loads from the
packaged GGUF (rows un-permuted as its loader does); the reference is gguf-py's dequantizer; and the
kernel (every build this machine runs, both ways through it) equals ``x @ W^T`` on those weights up
to the order of float32 sums, for random and real tensors at uneven batches.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from meswitch.engine.kernels import ggml_cpu
from meswitch.model import gguf_blocks

BUILDS = [pytest.param(i, marks=pytest.mark.skipif(not ggml_cpu.available(i), reason=f"no {i} build here"))
          for i in ggml_cpu.ISAS]
MODES = ["direct", "buffered"]
BATCHES = [1, 3, 16, 17]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_blocks(out: int, n: int, type: str, seed: int) -> torch.Tensor:
    """Random ``uint8 [out, n / 32 * block_bytes]`` of ``type`` with finite scales of a weight's size."""
    bb = ggml_cpu.TYPES[type][1]
    g = gen(seed)
    b = torch.randint(0, 256, (out, n // 32, bb), dtype=torch.uint8, generator=g)
    b[..., 0:2] = (torch.rand(out, n // 32, 1, generator=g) * 0.01 + 1e-3).half().view(torch.uint8)
    if type == "Q4_1":
        b[..., 2:4] = (-torch.rand(out, n // 32, 1, generator=g) * 0.08).half().view(torch.uint8)
    return b.reshape(out, -1)


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``y`` equals ``x @ w.T`` up to float32 summation order: ``|y - x @ w.T| <= 1e-5 * (|x| @ |w|.T)``."""
    ref = x @ w.T
    bound = 1e-5 * (x.abs() @ w.abs().T) + 1e-30
    worst = ((y - ref).abs() / bound).max().item() if y.numel() else 0.0
    assert y.shape == ref.shape and worst <= 1.0, f"error {worst:.2f}x the summation bound"


@functools.cache
def packaged() -> dict[str, gguf_blocks.BlockTensor]:
    from meswitch.model.checkpoint import packaged_gguf_path

    return gguf_blocks.read_blocks(packaged_gguf_path())


# ---- the block formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("type", ["Q4_1", "Q8_0"])
def test_the_reference_dequantizes_as_gguf_py_does(type):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    b = random_blocks(24, 96, type, seed=1)
    theirs = torch.from_numpy(dequantize(b.numpy(), GGMLQuantizationType[type]).astype(np.float32))
    assert torch.equal(ggml_cpu.dequantize(b, type, 24), theirs.view(24, 96))


def test_q4_1_low_nibbles_are_elements_0_to_15_high_nibbles_16_to_31():
    block = torch.zeros(1, 20, dtype=torch.uint8)
    block[0, 0:2] = torch.tensor([1.0]).half().view(torch.uint8)  # d = 1
    block[0, 2:4] = torch.tensor([0.5]).half().view(torch.uint8)  # m = 0.5
    block[0, 4:] = torch.arange(16, dtype=torch.uint8) | (15 - torch.arange(16, dtype=torch.uint8)) << 4
    want = torch.cat([torch.arange(16.0), 15 - torch.arange(16.0)]) + 0.5
    assert torch.equal(ggml_cpu.dequantize(block, "Q4_1", 1)[0], want)
    x = torch.eye(32)
    assert torch.equal(ggml_cpu.linear(x, block, "Q4_1", 1)[:, 0], want)


# ---- the kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("type", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536), (37, 96)])
@pytest.mark.parametrize("batch", BATCHES)
def test_kernel_equals_x_at_dequantized_weight_on_random_blocks(isa, mode, type, shape, batch):
    out, n = shape
    b = random_blocks(out, n, type, seed=out + n)
    x = torch.randn(batch, n, generator=gen(batch))
    y = ggml_cpu.linear(x, b, type, out, isa=isa, mode=mode)
    w = ggml_cpu.dequantize(b, type, out)
    assert_matmul_close(y, x, w)
    assert torch.equal(ggml_cpu.reference_linear(x, b, type, out), x @ w.T)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_on_the_head_shape(isa, mode):
    out, n = 49152, 576
    b = random_blocks(out, n, "Q8_0", seed=7)
    w = ggml_cpu.dequantize(b, "Q8_0", out)
    for batch in (1, 17):
        x = torch.randn(batch, n, generator=gen(batch))
        assert_matmul_close(ggml_cpu.linear(x, b, "Q8_0", out, isa=isa, mode=mode), x, w)


@pytest.mark.parametrize("isa", BUILDS)
def test_kernel_takes_strided_rows_and_empty_batches(isa):
    b = random_blocks(64, 128, "Q4_1", seed=3)
    w = ggml_cpu.dequantize(b, "Q4_1", 64)
    wide = torch.randn(5, 256, generator=gen(3))
    assert_matmul_close(ggml_cpu.linear(wide[:, :128], b, "Q4_1", 64, isa=isa), wide[:, :128], w)
    assert ggml_cpu.linear(torch.zeros(0, 128), b, "Q4_1", 64, isa=isa).shape == (0, 64)


def test_kernel_refuses_what_no_block_can_hold():
    b = random_blocks(8, 64, "Q4_1", seed=0)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        ggml_cpu.linear(torch.randn(2, 70), b, "Q4_1", 8)
    with pytest.raises(ValueError, match=r"x must be \[B, 64\]"):
        ggml_cpu.linear(torch.randn(2, 96), b, "Q4_1", 8)
    with pytest.raises(ValueError, match="no kernel for ggml type 'Q4_K'"):
        ggml_cpu.linear(torch.randn(2, 64), b, "Q4_K", 8)
    with pytest.raises(ValueError, match="not whole blocks"):
        ggml_cpu.linear(torch.randn(2, 64), b[:, :-1], "Q4_1", 8)
    with pytest.raises(ValueError, match=r"blocks must be uint8 \[9"):
        ggml_cpu.linear(torch.randn(2, 64), b, "Q4_1", 9)


# ---- the reader, on a small GGUF written here ------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.permute``): Hugging Face q/k rows -> GGUF rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 1-block llama GGUF (hidden 64, 4 heads, 2 kv heads, tied head): q/k permuted as llama.cpp stores
    them, o in Q4_1, the embedding in Q8_0, down in raw Q4_K bytes. Returns the Hugging Face weights
    (float32, before quantization) by name."""
    import gguf

    rng = np.random.default_rng(0)
    hf = {"q": rng.standard_normal((64, 64)), "k": rng.standard_normal((32, 64)), "o": rng.standard_normal((64, 64)),
          "embed": rng.standard_normal((100, 64))}
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_head_count(4)
    w.add_head_count_kv(2)
    q4_1, q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(llama_cpp_permute(hf["q"], 4), q4_1), raw_dtype=q4_1)
    w.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(llama_cpp_permute(hf["k"], 2), q4_1), raw_dtype=q4_1)
    w.add_tensor("blk.0.attn_output.weight", gguf.quants.quantize(hf["o"], q4_1), raw_dtype=q4_1)
    q4_k = rng.integers(0, 256, (64, 144), dtype=np.uint8)  # one 256-element block of 144 bytes a row
    q4_k[:, 0:4] = np.full((64, 2), 0.01, dtype=np.float16).view(np.uint8)  # finite d and dmin
    w.add_tensor("blk.0.ffn_down.weight", q4_k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.add_tensor("token_embd.weight", gguf.quants.quantize(hf["embed"], q8_0), raw_dtype=q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


def test_rope_row_order_undoes_llama_cpp_permutation():
    w = np.arange(24 * 3).reshape(24, 3)
    order = gguf_blocks.rope_row_order(24, 3)
    assert np.array_equal(llama_cpp_permute(w, 3)[order.numpy()], w)


def test_reader_names_unpermutes_ties_and_reports_k_quants(tmp_path):
    import gguf

    hf = write_tiny_gguf(tmp_path / "tiny.gguf")
    blocks = gguf_blocks.read_blocks(tmp_path / "tiny.gguf")
    assert set(blocks) == {f"model.layers.0.{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.o_proj", "mlp.down_proj")} | {
        "model.embed_tokens.weight", "lm_head.weight"}
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    for name, key in (("self_attn.q_proj", "q"), ("self_attn.k_proj", "k"), ("self_attn.o_proj", "o")):
        t = blocks[f"model.layers.0.{name}.weight"]
        assert (t.type, t.shape, t.has_kernel) == ("Q4_1", hf[key].shape, True)
        want = gguf.quants.quantize(hf[key], q4_1)  # rows are quantized independently: permuting commutes
        assert np.array_equal(t.blocks.numpy(), want), name
        assert torch.equal(ggml_cpu.dequantize(t.blocks, "Q4_1", t.shape[0]), gguf_blocks.dequantize(t))
    head, embed = blocks["lm_head.weight"], blocks["model.embed_tokens.weight"]
    assert (head.type, head.gguf_name, head.shape) == ("Q8_0", "token_embd.weight", (100, 64))
    assert head.blocks.data_ptr() == embed.blocks.data_ptr()
    down = blocks["model.layers.0.mlp.down_proj.weight"]
    assert (down.type, down.shape, down.has_kernel) == ("Q4_K", (64, 256), False)
    assert gguf_blocks.dequantize(down).shape == (64, 256)  # the fallback for types with no kernel
    with pytest.raises(ValueError, match="no kernel for ggml type 'Q4_K'"):
        ggml_cpu.linear(torch.randn(1, 256), down.blocks, down.type, 64)
    assert set(gguf_blocks.read_blocks(tmp_path / "tiny.gguf", names=["lm_head.weight"])) == {"lm_head.weight"}


# ---- the packaged SmolLM2-135M GGUF ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_weights(small_zoo) -> dict[str, torch.Tensor]:
    """What transformers loaded from the packaged GGUF, dequantized to float32 (the served base today): the
    zoo's source checkpoint, which ``load_packaged_base`` wrote once (the small zoo fixture ensures it)."""
    from safetensors.torch import load_file

    from meswitch.zoo.build import source_base_dir

    weights = {k: v for f in sorted(source_base_dir().glob("*.safetensors")) for k, v in load_file(f).items()}
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])  # tied: saved once
    return weights


def test_every_q4_1_and_q8_0_tensor_of_the_packaged_gguf_is_transformers_weight_bit_for_bit(transformers_weights):
    blocks = packaged()
    types = {t.gguf_name: t.type for t in blocks.values()}
    assert sum(t == "Q4_1" for t in types.values()) == 210 and sum(t == "Q8_0" for t in types.values()) == 1
    for name, t in blocks.items():
        assert t.has_kernel, name
        w = ggml_cpu.dequantize(t.blocks, t.type, t.shape[0])
        assert torch.equal(w, transformers_weights[name]), name


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                                  "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                  "model.layers.29.mlp.down_proj.weight", "lm_head.weight"])
def test_kernel_on_the_packaged_tensors(isa, name):
    t = packaged()[name]
    w = ggml_cpu.dequantize(t.blocks, t.type, t.shape[0])
    for batch in BATCHES:
        x = torch.randn(batch, t.shape[1], generator=gen(batch))
        assert_matmul_close(ggml_cpu.linear(x, t.blocks, t.type, t.shape[0], isa=isa), x, w)


def test_the_packaged_gemma_reports_its_k_quants():
    from meswitch.model.packaged import gemma_available, packaged_gemma_gguf

    if not gemma_available():
        pytest.skip("the packaged Gemma-3-270M is not installed")
    blocks = gguf_blocks.read_blocks(packaged_gemma_gguf(), names=["model.layers.0.self_attn.o_proj.weight",
                                                                   "model.layers.0.mlp.down_proj.weight",
                                                                   "model.layers.0.self_attn.v_proj.weight"])
    kinds = {n.split(".")[-2]: (t.type, t.has_kernel) for n, t in blocks.items()}
    assert kinds == {"o_proj": ("Q4_K", False), "down_proj": ("Q6_K", False), "v_proj": ("Q8_0", True)}
