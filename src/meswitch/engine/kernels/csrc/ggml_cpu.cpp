// y = x @ W^T for a weight W stored as ggml Q4_1 or Q8_0 blocks (meswitch/engine/kernels/ggml_cpu.py).
//
// W: uint8 [out, in / 32 * BB], each output row a run of blocks of 32 input columns:
//   Q4_1 (BB = 20): fp16 d, fp16 m, 16 bytes q   w[j] = d * (q[j] & 15) + m, w[16 + j] = d * (q[j] >> 4) + m
//   Q8_0 (BB = 34): fp16 d, 32 int8 q            w[j] = d * q[j]
// x: float [B, in] (unit column stride), y: float [B, out].
//
// Float arithmetic only: each weight is dequantized exactly (d * q is exact in float32: an fp16 d has
// 11 significant bits, q at most 8), so d * q + m in one FMA equals gguf-py's (d * q) + m, and the
// products with x are float32 FMAs: y equals x @ dequantized(W)^T up to the order of the sums.
//
// Two ways through, both parallel over output rows (at::parallel_for):
//  - direct (a few rows of x): each block is dequantized into registers and used at once by every
//    row of x (up to 4 rows per pass: more rows, more passes);
//  - buffered: a tile of TO output rows is dequantized one chunk of KC input columns at a time into a
//    float buffer in L1, which every row of a panel of up to RP rows of x then reads (one dequantization
//    for the whole panel); partial sums stay in an 8-lane array across chunks.
// Built with AVX2 + FMA + F16C, or without them (the portable loop at the end of this file).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MESWITCH_GGML_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // elements per block
enum Type : int64_t { Q4_1 = 0, Q8_0 = 1 };  // codes of ggml_cpu.py's TYPES

constexpr int64_t block_bytes(int64_t t) { return t == Q4_1 ? 20 : 34; }

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// One block -> w[0 .. 32), by the definition above.
template <int64_t T>
inline void dequant_scalar(const uint8_t* b, float* w) {
  if constexpr (T == Q4_1) {
    const float d = fp16(b), m = fp16(b + 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * static_cast<float>(b[4 + j] & 15) + m;
      w[16 + j] = d * static_cast<float>(b[4 + j] >> 4) + m;
    }
  } else {
    const float d = fp16(b);
    for (int j = 0; j < 32; ++j) w[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
  }
}

#ifdef MESWITCH_GGML_AVX2

constexpr int64_t TO = 8;    // output rows per buffered tile
constexpr int64_t KC = 256;  // input columns per buffered chunk (8 blocks)
constexpr int64_t RP = 64;   // rows of x per buffered panel

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One block -> w[0 .. 4), 8 elements each.
template <int64_t T>
__attribute__((always_inline)) inline void dequant(const uint8_t* b, __m256* w) {
  uint16_t dh;
  std::memcpy(&dh, b, 2);
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
  if constexpr (T == Q4_1) {
    uint16_t mh;
    std::memcpy(&mh, b + 2, 2);
    const __m256 m = _mm256_set1_ps(_cvtsh_ss(mh));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 4));
    const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    w[0] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), m);
    w[1] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo))), m);
    w[2] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), m);
    w[3] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi))), m);
  } else {
    for (int v = 0; v < 4; ++v) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * v));
      w[v] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  }
}

// Direct: y[r][o] = W[o] . x[r] for o < NO, r < NR; W[o] is the run of nb blocks at w + o * ldw.
// With one row, two accumulators per output halve the FMA chains.
template <int64_t T, int NO, int NR>
void direct(const uint8_t* w, int64_t ldw, int64_t nb, const float* x, int64_t ldx, float* y, int64_t ldy) {
  constexpr int A = NR == 1 ? 2 : 1;
  constexpr int64_t BB = block_bytes(T);
  __m256 acc[NO][NR][A];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r)
      for (int a = 0; a < A; ++a) acc[o][r][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
#pragma GCC unroll 4
    for (int o = 0; o < NO; ++o) {
      __m256 wv[4];
      dequant<T>(w + o * ldw + b * BB, wv);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) {
        const float* xr = x + r * ldx + b * QK;
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v)
          acc[o][r][v % A] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(xr + 8 * v), acc[o][r][v % A]);
      }
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) {
      __m256 s = acc[o][r][0];
      if constexpr (A == 2) s = _mm256_add_ps(s, acc[o][r][1]);
      y[r * ldy + o] = hsum(s);
    }
}

template <int64_t T, int NO>
void direct_rows(int64_t nr, const uint8_t* w, int64_t ldw, int64_t nb, const float* x, int64_t ldx, float* y,
                 int64_t ldy) {
  switch (nr) {
    case 1: return direct<T, NO, 1>(w, ldw, nb, x, ldx, y, ldy);
    case 2: return direct<T, NO, 2>(w, ldw, nb, x, ldx, y, ldy);
    case 3: return direct<T, NO, 3>(w, ldw, nb, x, ldx, y, ldy);
    default: return direct<T, NO, 4>(w, ldw, nb, x, ldx, y, ldy);
  }
}

// Rows [o0, o1) of y's columns, every row of x, blocks dequantized in registers.
template <int64_t T>
void direct_tile(const uint8_t* W, int64_t ldw, int64_t nb, const float* x, int64_t ldx, int64_t B, float* y,
                 int64_t ldy, int64_t o0, int64_t o1) {
  constexpr int NO = 4;
  for (int64_t r = 0; r < B; r += 4) {
    const int64_t nr = std::min<int64_t>(4, B - r);
    int64_t o = o0;
    for (; o + NO <= o1; o += NO)
      direct_rows<T, NO>(nr, W + o * ldw, ldw, nb, x + r * ldx, ldx, y + r * ldy + o, ldy);
    for (; o < o1; ++o) direct_rows<T, 1>(nr, W + o * ldw, ldw, nb, x + r * ldx, ldx, y + r * ldy + o, ldy);
  }
}

// Buffered: part[o][r] += wb[o][0 .. n) . x[r][0 .. n) (8 lanes) for o < NO, r < NR; n a multiple of 8.
template <int NO, int NR>
void panel(const float* wb, const float* x, int64_t ldx, int64_t n, __m256* part) {
  __m256 acc[NO][NR];
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) acc[o][r] = _mm256_load_ps(reinterpret_cast<const float*>(part + o * RP + r));
  for (int64_t k = 0; k < n; k += 8) {
    __m256 wv[NO];
    for (int o = 0; o < NO; ++o) wv[o] = _mm256_load_ps(wb + o * KC + k);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int o = 0; o < NO; ++o) acc[o][r] = _mm256_fmadd_ps(wv[o], xv, acc[o][r]);
    }
  }
  for (int o = 0; o < NO; ++o)
    for (int r = 0; r < NR; ++r) part[o * RP + r] = acc[o][r];
}

template <int NO>
void panel_rows(int64_t nr, const float* wb, const float* x, int64_t ldx, int64_t n, __m256* part) {
  switch (nr) {
    case 1: return panel<NO, 1>(wb, x, ldx, n, part);
    case 2: return panel<NO, 2>(wb, x, ldx, n, part);
    case 3: return panel<NO, 3>(wb, x, ldx, n, part);
    default: return panel<NO, 4>(wb, x, ldx, n, part);
  }
}

template <int64_t T>
void buffered_tile(const uint8_t* W, int64_t ldw, int64_t nb, const float* x, int64_t ldx, int64_t B, float* y,
                   int64_t ldy, int64_t o0, int64_t o1) {
  constexpr int64_t BB = block_bytes(T);
  alignas(32) float wb[TO * KC];
  alignas(32) __m256 part[TO * RP];
  const int64_t to = o1 - o0;
  for (int64_t p0 = 0; p0 < B; p0 += RP) {
    const int64_t np = std::min<int64_t>(RP, B - p0);
    for (int64_t i = 0; i < TO * RP; ++i) part[i] = _mm256_setzero_ps();
    for (int64_t b0 = 0; b0 < nb; b0 += KC / QK) {
      const int64_t cb = std::min<int64_t>(KC / QK, nb - b0), n = cb * QK;
      for (int64_t o = 0; o < to; ++o)
        for (int64_t b = 0; b < cb; ++b) {
          __m256 wv[4];
          dequant<T>(W + (o0 + o) * ldw + (b0 + b) * BB, wv);
          for (int v = 0; v < 4; ++v) _mm256_store_ps(wb + o * KC + b * QK + 8 * v, wv[v]);
        }
      const float* xc = x + p0 * ldx + b0 * QK;
      for (int64_t r = 0; r < np; r += 4) {
        const int64_t nr = std::min<int64_t>(4, np - r);
        int64_t o = 0;
        for (; o + 2 <= to; o += 2) panel_rows<2>(nr, wb + o * KC, xc + r * ldx, ldx, n, part + o * RP + r);
        for (; o < to; ++o) panel_rows<1>(nr, wb + o * KC, xc + r * ldx, ldx, n, part + o * RP + r);
      }
    }
    for (int64_t o = 0; o < to; ++o)
      for (int64_t r = 0; r < np; ++r) y[(p0 + r) * ldy + o0 + o] = hsum(part[o * RP + r]);
  }
}

template <int64_t T>
void run(const uint8_t* W, int64_t ldw, int64_t nb, const float* x, int64_t ldx, int64_t B, float* y, int64_t ldy,
         int64_t out, bool buffered) {
  const int64_t tile = buffered ? TO : 16;
  const int64_t tiles = (out + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t a, int64_t e) {
    for (int64_t t = a; t < e; ++t) {
      const int64_t o0 = t * tile, o1 = std::min(out, o0 + tile);
      if (buffered) buffered_tile<T>(W, ldw, nb, x, ldx, B, y, ldy, o0, o1);
      else direct_tile<T>(W, ldw, nb, x, ldx, B, y, ldy, o0, o1);
    }
  });
}

constexpr bool kAvx2 = true;

#else  // portable: one output row dequantized into a buffer, then a dot product with every row of x

template <int64_t T>
void run(const uint8_t* W, int64_t ldw, int64_t nb, const float* x, int64_t ldx, int64_t B, float* y, int64_t ldy,
         int64_t out, bool /*buffered*/) {
  constexpr int64_t BB = block_bytes(T);
  at::parallel_for(0, out, 16, [&](int64_t a, int64_t e) {
    std::vector<float> w(nb * QK);
    for (int64_t o = a; o < e; ++o) {
      for (int64_t b = 0; b < nb; ++b) dequant_scalar<T>(W + o * ldw + b * BB, w.data() + b * QK);
      for (int64_t r = 0; r < B; ++r) {
        const float* xr = x + r * ldx;
        float s = 0.f;
        for (int64_t k = 0; k < nb * QK; ++k) s += xr[k] * w[k];
        y[r * ldy + o] = s;
      }
    }
  });
}

constexpr bool kAvx2 = false;

#endif

}  // namespace

// x: float [B, in] (unit column stride), blocks: uint8 [out, in / 32 * BB] contiguous, type: 0 (Q4_1) or
// 1 (Q8_0); mode: 0 (direct for B <= direct_rows, else buffered), 1 (direct), 2 (buffered). -> y: float [B, out].
torch::Tensor linear(torch::Tensor x, torch::Tensor blocks, int64_t type, int64_t mode, int64_t direct_rows) {
  TORCH_CHECK(type == Q4_1 || type == Q8_0, "type must be 0 (Q4_1) or 1 (Q8_0), got ", type);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1,
              "x must be float32 [B, in] with unit column stride");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "blocks must be contiguous uint8 [out, row_bytes]");
  const int64_t bb = block_bytes(type), in = x.size(1), B = x.size(0), out = blocks.size(0);
  TORCH_CHECK(in % QK == 0 && blocks.size(1) == in / QK * bb, "blocks [", out, ", ", blocks.size(1),
              "] do not hold ", in, " input columns (", in / QK, " blocks of ", bb, " bytes a row)");
  auto y = torch::empty({B, out}, torch::kFloat);
  if (B == 0 || out == 0) return y;
  const bool buffered = mode == 2 || (mode == 0 && B > direct_rows);
  const uint8_t* W = blocks.data_ptr<uint8_t>();
  if (type == Q4_1) run<Q4_1>(W, blocks.size(1), in / QK, x.data_ptr<float>(), x.stride(0), B, y.data_ptr<float>(), out, out, buffered);
  else run<Q8_0>(W, blocks.size(1), in / QK, x.data_ptr<float>(), x.stride(0), B, y.data_ptr<float>(), out, out, buffered);
  return y;
}

// blocks: uint8 [out, in / 32 * BB] contiguous -> float [out, in], the weight they state (each element as in
// dequant_scalar, exact: the same floats as gguf-py's dequantizer). For merging a delta into the base and
// for an embedding's rows (the caller gathers the block rows first).
torch::Tensor dequantize(torch::Tensor blocks, int64_t type) {
  TORCH_CHECK(type == Q4_1 || type == Q8_0, "type must be 0 (Q4_1) or 1 (Q8_0), got ", type);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous(),
              "blocks must be contiguous uint8 [out, row_bytes]");
  const int64_t bb = block_bytes(type), out = blocks.size(0);
  TORCH_CHECK(blocks.size(1) % bb == 0, "rows of ", blocks.size(1), " bytes are not whole blocks of ", bb, " bytes");
  const int64_t nb = blocks.size(1) / bb;
  auto w = torch::empty({out, nb * QK}, torch::kFloat);
  const uint8_t* B = blocks.data_ptr<uint8_t>();
  float* W = w.data_ptr<float>();
  at::parallel_for(0, out, 64, [&](int64_t a, int64_t e) {
    for (int64_t o = a; o < e; ++o)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* src = B + o * nb * bb + b * bb;
        float* dst = W + (o * nb + b) * QK;
        if (type == Q4_1) dequant_scalar<Q4_1>(src, dst);
        else dequant_scalar<Q8_0>(src, dst);
      }
  });
  return w;
}

bool simd() { return kAvx2; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ W^T for W in ggml Q4_1 / Q8_0 blocks (ggml_cpu.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dequantize", &dequantize, "the float32 weight of Q4_1 / Q8_0 blocks (ggml_cpu.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("simd", &simd, "whether this build has the AVX2 + FMA + F16C path");
}
