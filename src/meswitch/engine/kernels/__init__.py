"""Kernels behind the delta backends: PyTorch's int4 CPU kernel (:mod:`.int4`), meswitch's low-bit
CPU kernel (:mod:`.lowbit_cpu`, C++ in ``csrc/``) and the Triton GPU kernel (:mod:`.sgmv_triton`).
Each documents its semantics in plain PyTorch and is tested against that reference."""
