"""Would a CPU kernel that reads the store's 2-bit codes as they are beat PyTorch's int4 kernel?

The engine's CPU path for mixed batches converts each delta to PyTorch's int4 weight-only layout
(``torch._weight_int4pack_mm_for_cpu``: half a byte per weight, bf16 activations). That kernel
works on 4 rows at a time, so an expert with 5-8 rows in a step costs as much as one with 8
(docs/engine.md). This probe compiles a small AVX512 kernel (``torch.utils.cpp_extension`` with OpenMP,
about 25 s the first time, cached after) that computes ``y[r, o] += s_o * (x_r . c_o) + z_o * sum(x_r)``
straight from the packed 2-bit rows (16 codes per 32-bit word, shifted into float lanes, fp32
FMAs, two output rows per pass sharing each activation load), and times it against the int4
kernel on one expert's stacked decoder shapes (q/k/v, o, gate/up, down of the full zoo's base,
30 layers) for 1 to 8 rows. It is a measurement, not an engine path: it needs a compiler and
AVX512, checks itself against the float formula first, and prints ms per expert and the ratio.

    python benchmarks/cpu_lowbit_probe.py [--threads 2] [--json docs/results/cpu_lowbit_probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

constexpr int OB = 2;  // output rows per pass: each activation load feeds OB FMAs

template <int NR>
static void block(const float* X, int K, const uint8_t* P, int pb, __m512* acc) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i mask = _mm512_set1_epi32(3);
  for (int j = 0; j < NR * OB; ++j) acc[j] = _mm512_setzero_ps();
  for (int b = 0; b < K / 16; ++b) {
    __m512 w[OB];
    #pragma GCC unroll 4
    for (int q = 0; q < OB; ++q) {
      uint32_t word = reinterpret_cast<const uint32_t*>(P + q * pb)[b];
      w[q] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(word), shifts), mask));
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      __m512 xv = _mm512_loadu_ps(X + r * K + b * 16);
      #pragma GCC unroll 4
      for (int q = 0; q < OB; ++q) acc[r * OB + q] = _mm512_fmadd_ps(xv, w[q], acc[r * OB + q]);
    }
  }
}

// x: float [n, K]; packed: uint8 [N, K / 4] (2-bit codes, LSB first); scale, zero: float [N];
// y: float [n, N], accumulated: y[r, o] += scale[o] * (x[r] . c[o]) + zero[o] * sum(x[r]).
void delta_mm2(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, torch::Tensor y) {
  const int n = x.size(0), K = x.size(1), N = packed.size(0), pb = packed.size(1);
  TORCH_CHECK(K % 16 == 0 && N % OB == 0 && pb * 4 == K, "shapes the probe does not take");
  const float* X = x.data_ptr<float>();
  const uint8_t* P = packed.data_ptr<uint8_t>();
  const float* S = scale.data_ptr<float>();
  const float* Z = zero.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  std::vector<float> xs(n, 0.f);
  for (int r = 0; r < n; ++r)
    for (int i = 0; i < K; ++i) xs[r] += X[r * K + i];
  at::parallel_for(0, N / OB, 8, [&](int64_t b0, int64_t b1) {
    __m512 acc[8 * OB];
    for (int64_t ob = b0; ob < b1; ++ob) {
      const int64_t o = ob * OB;
      for (int r0 = 0; r0 < n; r0 += 8) {
        const int nr = std::min(8, n - r0);
        const float* Xr = X + r0 * K;
        switch (nr) {
          case 1: block<1>(Xr, K, P + o * pb, pb, acc); break;
          case 2: block<2>(Xr, K, P + o * pb, pb, acc); break;
          case 3: block<3>(Xr, K, P + o * pb, pb, acc); break;
          case 4: block<4>(Xr, K, P + o * pb, pb, acc); break;
          case 5: block<5>(Xr, K, P + o * pb, pb, acc); break;
          case 6: block<6>(Xr, K, P + o * pb, pb, acc); break;
          case 7: block<7>(Xr, K, P + o * pb, pb, acc); break;
          default: block<8>(Xr, K, P + o * pb, pb, acc); break;
        }
        for (int r = 0; r < nr; ++r)
          for (int q = 0; q < OB; ++q)
            Y[(r0 + r) * N + o + q] += S[o + q] * _mm512_reduce_add_ps(acc[r * OB + q]) + Z[o + q] * xs[r0 + r];
      }
    }
  });
}
"""
# One expert's calls per decoder layer, (out, in), as the engine stacks them: q/k/v, o, gate/up, down.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
LAYERS = 30


def timed(fn, repeats: int = 10) -> float:
    """Best of three means over ``repeats`` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats * 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from torch.utils.cpp_extension import load_inline

    from meswitch.compress.pack import pack

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        mod = load_inline("meswitch_lowbit_probe", cpp_sources=KERNEL, functions=["delta_mm2"],
                          extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no AVX512: nothing to measure here
        print(f"the probe kernel does not build here: {exc}", file=sys.stderr)
        return 1
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 4, (96, 576), dtype=torch.uint8, generator=g)
    x, s = torch.randn(5, 576, generator=g), torch.rand(96, generator=g)
    y = torch.zeros(5, 96)
    mod.delta_mm2(x, pack(codes, 2), s, -1.5 * s, y)
    want = (x @ (codes.float() - 1.5).T) * s
    err = float((y - want).abs().max() / want.abs().max())
    if err > 1e-5:
        print(f"the probe kernel is wrong: relative error {err:.2e}", file=sys.stderr)
        return 1

    mine = [[(pack(torch.randint(0, 4, sh, dtype=torch.uint8, generator=g), 2), torch.rand(sh[0], generator=g),
              torch.rand(sh[0], generator=g)) for sh in SHAPES] for _ in range(LAYERS)]
    int4 = [[(torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, sh, dtype=torch.int32, generator=g), 2),
              torch.rand(sh[1] // 64, sh[0], 2, generator=g).bfloat16()) for sh in SHAPES] for _ in range(LAYERS)]
    rows: dict[str, dict[str, float]] = {}
    print("| rows | 2-bit probe ms/expert | int4 kernel ms/expert | int4 / probe |\n|---|---|---|---|")
    for n in (1, 2, 3, 4, 5, 6, 8):
        xs = {576: torch.randn(n, 576, generator=g), 1536: torch.randn(n, 1536, generator=g)}
        xb = {k: v.bfloat16() for k, v in xs.items()}
        ys = {o: torch.zeros(n, o) for o, _ in SHAPES}

        def probe(xs=xs, ys=ys):
            for layer in mine:
                for (p, sc, z), (o, i) in zip(layer, SHAPES, strict=True):
                    mod.delta_mm2(xs[i], p, sc, z, ys[o])

        def kernel(xb=xb):
            for layer in int4:
                for (p, sz), (_, i) in zip(layer, SHAPES, strict=True):
                    torch._weight_int4pack_mm_for_cpu(xb[i], p, 64, sz)

        for _ in range(2):  # in turn, twice: the second pair is kept
            a, b = timed(probe), timed(kernel)
        rows[str(n)] = {"probe_ms": a, "int4_ms": b}
        print(f"| {n} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "check_rel_err": err, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
