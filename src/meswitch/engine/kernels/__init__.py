"""Kernels behind the delta backends: PyTorch's int4 CPU kernel (:mod:`.int4`), meswitch's low-bit
CPU kernel (:mod:`.lowbit_cpu`, C++ in ``csrc/``), the LoRA CPU kernel for 16-bit low-rank factors
(:mod:`.lora_cpu`, C++ inline), the GGML CPU kernel for a GGUF base's Q4_1/Q8_0 blocks (:mod:`.ggml_cpu`,
C++ in ``csrc/``) and the Triton GPU kernel (:mod:`.sgmv_triton`).
Each documents its semantics in plain PyTorch and is tested against that reference; :mod:`.cpu_build`
compiles and caches the C++ ones."""
