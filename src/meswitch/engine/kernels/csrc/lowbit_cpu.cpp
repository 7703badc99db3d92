// Low-bit delta SGMV for x86 CPUs: y[s:t] += x[s:t] @ delta_e^T for each segment.
//
// Compiled once per instruction set (meswitch/engine/lowbit_cpu.py picks what the CPU has): with
// AVX512-VNNI, vpdpbusd multiplies 64 unsigned codes by 4 int8 activations per output lane in one
// instruction; with AVX2 alone, vpmaddubsw + vpmaddwd compute the same int32 sums (no saturation:
// two products of a code below 16 and an int8 fit int16) on 256-bit halves of the same tiles.
//
// Weights (meswitch/engine/lowbit_cpu.py builds them): the codes of one delta, unsigned, in
// tiles of 16 output rows x 4 input columns (64 bytes, byte 4 * o + j = code[o][4 * q + j]: the
// operand layout of vpdpbusd), with P = 8 / bits consecutive tiles sharing one 64-byte chunk,
// tile p in bits [bits * p, bits * (p + 1)) of each byte. Shape uint8 [NB, Kp / (4 * P), 64]
// for NB = ceil(out / 16) output blocks and Kp = in rounded up to G.
//
// Activations are quantized to int8 per row and per group of G = 64 input columns (absmax / 127);
// each group's int32 dot products are scaled into float accumulators. With s_o the step size and
// z_o the zero term of output o:
//
//   y[r][o] += s_o * sum_g xs[r][g] * (sum_{k in g} c[o][k] * xq[r][k]) + z_o * sum_k xs[r][k / G] * xq[r][k]
//
// which is x_hat @ ((c - m) * s)^T (z_o = -m * s_o) or x_hat @ (c * s + zero)^T (z_o = zero_o),
// x_hat the dequantized activations: exact up to float32 rounding given x_hat.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int G = 64;   // input columns per activation scale

struct Rows {
  const int8_t* xq;  // [T, Kp]
  const float* xs;   // [T, Kp / G]
  const float* xsum; // [T]
  int64_t kp;
};

// Each instruction set below defines tile<BITS, NR>(w, x, r0, acc): the dot products of one block
// of 16 outputs with rows r0 .. r0 + NR, compiled for NR = 1 .. MR. Forced inline: called, the
// accumulators would live in memory (vector types may alias anything) and the kernel runs ~1.7x slower.
template <int BITS, int NR, typename Acc>
inline void tile(const uint8_t* w, const Rows& x, int64_t r0, Acc* acc);

// tile<BITS, n> for a run-time n in 1 .. NR.
template <int BITS, int NR, typename Acc>
__attribute__((always_inline)) inline void tile_rows(int64_t n, const uint8_t* w, const Rows& x, int64_t r0, Acc* acc) {
  if constexpr (NR > 1) {
    if (n < NR) return tile_rows<BITS, NR - 1>(n, w, x, r0, acc);
  }
  tile<BITS, NR>(w, x, r0, acc);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

constexpr int MR = 8;   // rows per register tile

// acc[r] (16 outputs) = sum over the block's K of codes * x_hat for rows r0 .. r0 + NR.
template <int BITS, int NR, typename Acc>
__attribute__((always_inline)) inline void tile(const uint8_t* w, const Rows& x, int64_t r0, Acc* acc) {  // Acc = __m512
  constexpr int P = 8 / BITS;
  constexpr int CHUNKS = G / (4 * P);  // 64-byte chunks per activation group
  const __m512i mask = _mm512_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const int64_t groups = x.kp / G;
  for (int r = 0; r < NR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i ai[NR];
    for (int r = 0; r < NR; ++r) ai[r] = _mm512_setzero_si512();
    const int8_t* xg = x.xq + r0 * x.kp + g * G;
    #pragma GCC unroll 16
    for (int c = 0; c < CHUNKS; ++c) {
      const __m512i v = _mm512_loadu_si512(w + (g * CHUNKS + c) * 64);
      #pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        // 16-bit shifts carry the next byte's low bits into each byte's top: every plane is masked
        const __m512i wp = _mm512_and_si512(p == 0 ? v : _mm512_srli_epi16(v, BITS * p), mask);
        const int q = (c * P + p) * 4;  // activation column of this tile, within the group
        #pragma GCC unroll 8
        for (int r = 0; r < NR; ++r) {
          const int32_t xv = *reinterpret_cast<const int32_t*>(xg + r * x.kp + q);
          ai[r] = _mm512_dpbusd_epi32(ai[r], wp, _mm512_set1_epi32(xv));
        }
      }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < NR; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r]), _mm512_set1_ps(x.xs[(r0 + r) * (x.kp / G) + g]), acc[r]);
  }
}

template <int BITS>
void rows_block(const uint8_t* w, const Rows& x, int64_t r0, int64_t r1, const float* s, const float* z,
                int64_t o, int64_t out, float* y, int64_t ldy) {
  const __mmask16 m = out - o >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (out - o)) - 1);
  const __m512 sv = _mm512_maskz_loadu_ps(m, s + o), zv = _mm512_maskz_loadu_ps(m, z + o);
  __m512 acc[MR];
  for (int64_t r = r0; r < r1; r += MR) {
    const int64_t n = std::min<int64_t>(MR, r1 - r);
    tile_rows<BITS, MR>(n, w, x, r, acc);
    for (int64_t i = 0; i < n; ++i) {
      float* yr = y + (r + i) * ldy + o;
      __m512 v = _mm512_fmadd_ps(sv, acc[i], _mm512_mul_ps(zv, _mm512_set1_ps(x.xsum[r + i])));
      _mm512_mask_storeu_ps(yr, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, yr), v));
    }
  }
}

// One group of n <= G activations xr -> q[0 .. G) (int8, zero padded), *scale (absmax / 127); returns sum(q).
inline int32_t quantize_group(const float* xr, int64_t n, int8_t* q, float* scale) {
  __m512 v[G / 16];
  __m512 amax = _mm512_setzero_ps();
  for (int j = 0; j < G / 16; ++j) {
    const int64_t left = n - 16 * j;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    v[j] = _mm512_maskz_loadu_ps(m, xr + 16 * j);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
  }
  const float a = _mm512_reduce_max_ps(amax);
  *scale = a > 0.f ? a / 127.f : 0.f;
  const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
  __m512i qsum = _mm512_setzero_si512();
  for (int j = 0; j < G / 16; ++j) {
    const __m512i qj = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], inv));  // round to nearest even
    qsum = _mm512_add_epi32(qsum, qj);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * j), _mm512_cvtsepi32_epi8(qj));
  }
  return _mm512_reduce_add_epi32(qsum);
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr int MR = 4;   // rows per register tile: two 8-lane accumulators per row

// acc[2r], acc[2r + 1] (outputs 0-7, 8-15) = sum over the block's K of codes * x_hat for rows r0 .. r0 + NR.
template <int BITS, int NR, typename Acc>
__attribute__((always_inline)) inline void tile(const uint8_t* w, const Rows& x, int64_t r0, Acc* acc) {  // Acc = __m256, two per row
  constexpr int P = 8 / BITS;
  constexpr int CHUNKS = G / (4 * P);
  const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << BITS) - 1));
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t groups = x.kp / G;
  for (int r = 0; r < 2 * NR; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i ai[2 * NR];
    for (int r = 0; r < 2 * NR; ++r) ai[r] = _mm256_setzero_si256();
    const int8_t* xg = x.xq + r0 * x.kp + g * G;
    #pragma GCC unroll 16
    for (int c = 0; c < CHUNKS; ++c) {
      const uint8_t* chunk = w + (g * CHUNKS + c) * 64;
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk + 32));
      #pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const __m256i w0 = _mm256_and_si256(p == 0 ? v0 : _mm256_srli_epi16(v0, BITS * p), mask);
        const __m256i w1 = _mm256_and_si256(p == 0 ? v1 : _mm256_srli_epi16(v1, BITS * p), mask);
        const int q = (c * P + p) * 4;
        #pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
          const __m256i xv = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(xg + r * x.kp + q));
          ai[2 * r] = _mm256_add_epi32(ai[2 * r], _mm256_madd_epi16(_mm256_maddubs_epi16(w0, xv), ones));
          ai[2 * r + 1] = _mm256_add_epi32(ai[2 * r + 1], _mm256_madd_epi16(_mm256_maddubs_epi16(w1, xv), ones));
        }
      }
    }
    #pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      const __m256 s = _mm256_set1_ps(x.xs[(r0 + r) * (x.kp / G) + g]);
      acc[2 * r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[2 * r]), s, acc[2 * r]);
      acc[2 * r + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai[2 * r + 1]), s, acc[2 * r + 1]);
    }
  }
}

template <int BITS>
void rows_block(const uint8_t* w, const Rows& x, int64_t r0, int64_t r1, const float* s, const float* z,
                int64_t o, int64_t out, float* y, int64_t ldy) {
  const int64_t width = std::min<int64_t>(16, out - o);
  __m256 acc[2 * MR];
  alignas(32) float part[16];
  for (int64_t r = r0; r < r1; r += MR) {
    const int64_t n = std::min<int64_t>(MR, r1 - r);
    tile_rows<BITS, MR>(n, w, x, r, acc);
    for (int64_t i = 0; i < n; ++i) {
      _mm256_store_ps(part, acc[2 * i]);
      _mm256_store_ps(part + 8, acc[2 * i + 1]);
      float* yr = y + (r + i) * ldy + o;
      const float xsum = x.xsum[r + i];
      for (int64_t j = 0; j < width; ++j) yr[j] += s[o + j] * part[j] + z[o + j] * xsum;
    }
  }
}

// One group of n <= G activations xr -> q[0 .. G) (int8, zero padded), *scale (absmax / 127); returns sum(q).
inline int32_t quantize_group(const float* xr, int64_t n, int8_t* q, float* scale) {
  float a = 0.f;
  for (int64_t k = 0; k < n; ++k) a = std::max(a, std::fabs(xr[k]));
  const float inv = a > 0.f ? 127.f / a : 0.f;
  int32_t qsum = 0;
  for (int64_t k = 0; k < G; ++k) {
    const int32_t qk = k < n ? static_cast<int32_t>(std::nearbyint(xr[k] * inv)) : 0;  // to nearest even
    q[k] = static_cast<int8_t>(qk);
    qsum += qk;
  }
  *scale = a > 0.f ? a / 127.f : 0.f;
  return qsum;
}

#else
#error "the low-bit CPU kernel needs AVX512-VNNI or AVX2 with FMA"
#endif

// x: float [T, in] -> xq: int8 [T, Kp] (zero padded), xs: float [T, Kp / G], xsum: float [T] (sum of x_hat).
void quantize(const float* x, int64_t T, int64_t in, int64_t ldx, int64_t kp, int8_t* xq, float* xs, float* xsum) {
  const int64_t groups = kp / G;
  for (int64_t r = 0; r < T; ++r) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * G, n = std::max<int64_t>(0, std::min<int64_t>(G, in - k0));
      float* scale = xs + r * groups + g;
      const int32_t qsum = quantize_group(x + r * ldx + k0, n, xq + r * kp + k0, scale);
      total += *scale * static_cast<float>(qsum);
    }
    xsum[r] = total;
  }
}

}  // namespace

// x: float [T, in] (unit column stride); y: float [T, N] (unit column stride), accumulated.
// Form i: rows [starts[i], ends[i]) and columns [cols[i], cols[i] + out_i) of y get packed[i]
// (uint8 [ceil(out_i / 16), Kp / (4 * P), 64] at bits[i] in {1, 2, 4}) with scale[i], zero[i]
// (float [out_i]). Forms may not overlap in both rows and columns (their work runs in parallel).
void sgmv(torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> packed, std::vector<torch::Tensor> scale,
          std::vector<torch::Tensor> zero, std::vector<int64_t> bits, std::vector<int64_t> starts,
          std::vector<int64_t> ends, std::vector<int64_t> cols) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.stride(1) == 1, "x must be float [T, in], unit column stride");
  TORCH_CHECK(y.dim() == 2 && y.scalar_type() == torch::kFloat && y.stride(1) == 1 && y.size(0) == x.size(0),
              "y must be float [T, N], unit column stride, as many rows as x");
  const size_t F = packed.size();
  TORCH_CHECK(scale.size() == F && zero.size() == F && bits.size() == F && starts.size() == F && ends.size() == F &&
              cols.size() == F, "one scale, zero, bits, start, end and column per packed delta");
  const int64_t T = x.size(0), in = x.size(1), kp = (in + G - 1) / G * G;
  std::vector<int64_t> outs(F);
  for (size_t i = 0; i < F; ++i) {
    const int64_t out = scale[i].numel(), nb = (out + 15) / 16;
    TORCH_CHECK(bits[i] == 1 || bits[i] == 2 || bits[i] == 4, "bits must be 1, 2 or 4, got ", bits[i]);
    const int64_t P = 8 / bits[i];
    TORCH_CHECK(packed[i].scalar_type() == torch::kUInt8 && packed[i].is_contiguous() && packed[i].dim() == 3 &&
                packed[i].size(0) == nb && packed[i].size(1) == kp / (4 * P) && packed[i].size(2) == 64,
                "packed delta ", i, " must be contiguous uint8 [", nb, ", ", kp / (4 * P), ", 64], got ", packed[i].sizes());
    TORCH_CHECK(zero[i].numel() == out && scale[i].scalar_type() == torch::kFloat && zero[i].scalar_type() == torch::kFloat &&
                scale[i].is_contiguous() && zero[i].is_contiguous(), "scale and zero must be contiguous float [out]");
    TORCH_CHECK(0 <= starts[i] && starts[i] <= ends[i] && ends[i] <= T, "rows [", starts[i], ", ", ends[i], ") out of range");
    TORCH_CHECK(0 <= cols[i] && cols[i] + out <= y.size(1), "columns [", cols[i], ", ", cols[i] + out, ") out of range");
    outs[i] = out;
  }
  std::vector<size_t> live;
  for (size_t i = 0; i < F; ++i)
    if (ends[i] > starts[i]) live.push_back(i);
  for (size_t a = 0; a < live.size(); ++a)
    for (size_t b = a + 1; b < live.size(); ++b) {
      const size_t i = live[a], j = live[b];
      TORCH_CHECK(ends[i] <= starts[j] || ends[j] <= starts[i] || cols[i] + outs[i] <= cols[j] ||
                  cols[j] + outs[j] <= cols[i], "packed deltas ", i, " and ", j, " overlap in rows and columns");
    }
  auto xq = torch::empty({T, kp}, torch::kInt8);
  auto xs = torch::empty({T, kp / G}, torch::kFloat);
  auto xsum = torch::empty({T}, torch::kFloat);
  quantize(x.data_ptr<float>(), T, in, x.stride(0), kp, xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<float>());
  const Rows rows{xq.data_ptr<int8_t>(), xs.data_ptr<float>(), xsum.data_ptr<float>(), kp};
  float* Y = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  std::vector<int64_t> first{0};  // work items (form, block of 16 outputs): form live[f] owns [first[f], first[f + 1])
  for (size_t i : live) first.push_back(first.back() + (outs[i] + 15) / 16);
  at::parallel_for(0, first.back(), 1, [&](int64_t a, int64_t b) {
    size_t f = std::upper_bound(first.begin(), first.end(), a) - first.begin() - 1;
    for (int64_t it = a; it < b; ++it) {
      while (it >= first[f + 1]) ++f;
      const size_t i = live[f];
      const int64_t ob = it - first[f];
      const uint8_t* w = packed[i].data_ptr<uint8_t>() + ob * packed[i].size(1) * 64;
      const float* s = scale[i].data_ptr<float>();
      const float* z = zero[i].data_ptr<float>();
      float* Yi = Y + cols[i];
      switch (bits[i]) {
        case 1: rows_block<1>(w, rows, starts[i], ends[i], s, z, ob * 16, outs[i], Yi, ldy); break;
        case 2: rows_block<2>(w, rows, starts[i], ends[i], s, z, ob * 16, outs[i], Yi, ldy); break;
        default: rows_block<4>(w, rows, starts[i], ends[i], s, z, ob * 16, outs[i], Yi, ldy); break;
      }
    }
  });
}

// The layout above straight from a store's packed codes (meswitch/deltas/pack.py: row o one little-endian
// bitstream, code k in stream bits [k * bits, (k + 1) * bits)): packed uint8 [out, ceil(n * bits / 8)] of n
// codes at bits in 1 .. 4, put in input columns cols[k] (int64 [n], each in [0, in); empty: column k, in = n),
// the other columns' slots 0 -> uint8 [ceil(out / 16), Kp / (4 * P), 64] at lbits in {1, 2, 4}, lbits >= bits.
// Where cols name a column twice, the later code holds it.

namespace {

struct LayoutArgs {  // checked arguments: packed contiguous uint8 [out, width], cols contiguous int64 [n] or empty
  torch::Tensor packed, cols;
  int64_t bits, n, in, lbits, width, out, nb, kp, chunks;
  bool mapped;
};

LayoutArgs layout_args(torch::Tensor packed, int64_t bits, int64_t n, torch::Tensor cols, int64_t in, int64_t lbits) {
  TORCH_CHECK(bits >= 1 && bits <= 4, "bits must be 1 .. 4, got ", bits);
  TORCH_CHECK((lbits == 1 || lbits == 2 || lbits == 4) && lbits >= bits, "layout bits must be 1, 2 or 4 and at least ",
              bits, ", got ", lbits);
  const int64_t width = (n * bits + 7) / 8;
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.size(1) == width,
              "packed must be uint8 [out, ", width, "], got ", packed.scalar_type(), " ", packed.sizes());
  const bool mapped = cols.numel() > 0;
  if (mapped) {
    TORCH_CHECK(cols.scalar_type() == torch::kLong && cols.dim() == 1 && cols.numel() == n,
                "cols must be int64 [", n, "], got ", cols.scalar_type(), " ", cols.sizes());
  } else {
    TORCH_CHECK(in == n, "without cols, in (", in, ") must be n (", n, ")");
  }
  packed = packed.contiguous();
  cols = cols.contiguous();
  if (mapped) {
    const int64_t* col = cols.data_ptr<int64_t>();
    for (int64_t k = 0; k < n; ++k) TORCH_CHECK(0 <= col[k] && col[k] < in, "cols[", k, "] = ", col[k], " not in [0, ", in, ")");
  }
  const int64_t out = packed.size(0), kp = (in + G - 1) / G * G;
  return {packed, cols, bits, n, in, lbits, width, out, (out + 15) / 16, kp, kp / (4 * (8 / lbits)), mapped};
}

// f(integral_constant<int, bits>{}, integral_constant<int, lbits>{}) for a checked (bits, lbits).
template <typename F>
void with_bits(int64_t bits, int64_t lbits, F&& f) {
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  if (bits == 1 && lbits == 1) f(I1{}, I1{});
  else if (bits == 1 && lbits == 2) f(I1{}, I2{});
  else if (bits == 1) f(I1{}, I4{});
  else if (bits == 2 && lbits == 2) f(I2{}, I2{});
  else if (bits == 2) f(I2{}, I4{});
  else if (bits == 3) f(I3{}, I4{});
  else f(I4{}, I4{});
}

// 64 stream bits of a row of width bytes from bit sbit on (sbit may lie before or past the row: zeros there).
inline uint64_t bits_at(const uint8_t* r, int64_t width, int64_t sbit) {
  const int64_t b = sbit >> 3;  // floor
  const int s = static_cast<int>(sbit & 7);
  uint64_t lo = 0, hi = 0;
  if (b >= 0 && b + 9 <= width) {
    std::memcpy(&lo, r + b, 8);
    hi = r[b + 8];
  } else {
    for (int t = 0; t < 8; ++t)
      if (b + t >= 0 && b + t < width) lo |= static_cast<uint64_t>(r[b + t]) << (8 * t);
    if (b + 8 >= 0 && b + 8 < width) hi = r[b + 8];
  }
  return (lo >> s) | ((hi << 1) << (63 - s));
}

// One source piece of a word of a row at bits: (the row's stream bits from bit 8 * byte + shift on) & mask.
struct Seg {
  int64_t byte;
  int shift;
  bool wide;  // mask reaches past bit 63 - shift: the byte at byte + 8 takes part
  uint64_t mask;
};

// Sets the B bits at bit pos of the words d to v (a field may span two words).
template <int B>
inline void set_bits(uint64_t* d, int64_t pos, uint64_t v) {
  constexpr uint64_t M = (1u << B) - 1;
  const int64_t w = pos >> 6;
  const int s = static_cast<int>(pos & 63);
  d[w] = (d[w] & ~(M << s)) | (v << s);
  if (s + B > 64) d[w + 1] = (d[w + 1] & ~(M >> (64 - s))) | (v >> (64 - s));
}

// Exchanges index bits A < C of the 64 bit positions: bit i goes to i with bits A and C swapped.
template <int A, int C>
constexpr uint64_t swap_mask() {
  uint64_t m = 0;
  for (int i = 0; i < 64; ++i)
    if (((i >> A) & 1) && !((i >> C) & 1)) m |= uint64_t(1) << i;
  return m;
}

template <int A, int C, typename T>
inline T swap_index_bits(T x) {
  constexpr int D = (1 << C) - (1 << A);
  constexpr uint64_t M = swap_mask<A, C>();
  const T t = ((x >> D) ^ x) & M;
  return x ^ t ^ (t << D);
}

// Two chunks' codes of one row, 32 / LB consecutive columns per 32-bit half (column m = 4 * p + j at bit
// LB * m) -> that row's 4 layout bytes of each chunk (byte j holds column 4 * p + j at bit LB * p).
template <int LB, typename T>
inline T to_tiles(T x) {
  if constexpr (LB == 1) {  // bit 4p + j -> 8j + p
    x = swap_index_bits<0, 2>(x);
    x = swap_index_bits<1, 3>(x);
    x = swap_index_bits<2, 4>(x);
    return swap_index_bits<3, 4>(x);
  } else if constexpr (LB == 2) {  // 2-bit field 4p + j -> 4j + p
    x = swap_index_bits<1, 3>(x);
    return swap_index_bits<2, 4>(x);
  } else {  // nibble 4p + j -> 2j + p
    x = swap_index_bits<2, 4>(x);
    return swap_index_bits<3, 4>(x);
  }
}

// 64 / LB codes packed at B bits in the low bits of x -> the same codes at LB bits: the upper halves of blocks
// of 2g codes move up by g (LB - B) bits, g = 32 / LB .. 1.
template <int B, int LB, int Gc>
constexpr uint64_t spread_mask() {  // bits [g B, 2 g B) of each block of 2 g LB bits
  uint64_t m = 0;
  for (int base = 0; base < 64; base += 2 * Gc * LB)
    for (int b = Gc * B; b < 2 * Gc * B; ++b) m |= uint64_t(1) << (base + b);
  return m;
}

template <int B, int LB, int Gc = 32 / LB, typename T>
inline T spread(T x) {
  if constexpr (B == LB) {
    return x;
  } else {
    constexpr uint64_t M = spread_mask<B, LB, Gc>();
    x = (x & ~M) | ((x & M) << (Gc * (LB - B)));
    if constexpr (Gc > 1) return spread<B, LB, Gc / 2>(x);
    else return x;
  }
}

typedef uint64_t u64x4 __attribute__((vector_size(32)));  // 4 words at once (GCC/Clang vector extension)

// x[k] (to_tiles of word u of a row, chunks 2u and 2u + 1) -> its 4 bytes of chunk 2u at c[4 k ..), of chunk 2u + 1
// at c[64 + 4 k ..).
inline void store_tiles(uint8_t* c, u64x4 x) {
#if defined(__clang__) || __GNUC__ >= 12  // __builtin_shufflevector
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  const u32x8 h = reinterpret_cast<u32x8>(x);
  const u32x8 t = __builtin_shufflevector(h, h, 0, 2, 4, 6, 1, 3, 5, 7);
  std::memcpy(c, &t, 16);
  std::memcpy(c + 64, reinterpret_cast<const uint8_t*>(&t) + 16, 16);
#else
  for (int k = 0; k < 4; ++k) {
    const uint32_t l = static_cast<uint32_t>(x[k]), h = static_cast<uint32_t>(x[k] >> 32);
    std::memcpy(c + 4 * k, &l, 4);
    std::memcpy(c + 64 + 4 * k, &h, 4);
  }
#endif
}

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

}  // namespace

// Word u of a row at lbits (two chunks of it: 64 / lbits columns) is spread from the same columns at bits, which
// are taken straight from the packed row: the pieces (Seg) of runs of consecutive columns (without cols: one run,
// with cols strictly ascending: cols[k0 .. k0 + len) = c0 .. c0 + len), the same for every row. Other cols: the
// rows of a block are first built at bits with columns in place, zero codes in the others. Each word is then
// bit-permuted into the row's 4 bytes of both chunks, 4 rows at a time.
torch::Tensor layout_packed(torch::Tensor packed_in, int64_t bits_in, int64_t n_in, torch::Tensor cols_in, int64_t in_in,
                            int64_t lbits_in) {
  const LayoutArgs a = layout_args(packed_in, bits_in, n_in, cols_in, in_in, lbits_in);
  const int64_t n = a.n, width = a.width, out = a.out, nb = a.nb, kp = a.kp, chunks = a.chunks;
  const int64_t* col = a.mapped ? a.cols.data_ptr<int64_t>() : nullptr;
  bool ascending = true;
  for (int64_t k = 1; k < n && a.mapped && ascending; ++k) ascending = col[k] > col[k - 1];
  const bool build = a.mapped && !ascending;  // rows built at bits in buffers first
  std::vector<int64_t> runs;  // (k0, c0, len): codes k0 .. k0 + len -> columns c0 .. c0 + len, c0 ascending
  if (build) {
    runs = {0, 0, kp};  // the built rows, as they are
  } else if (!a.mapped) {
    if (n > 0) runs = {0, 0, n};
  } else {
    for (int64_t k = 0; k < n; ++k) {
      if (k > 0 && col[k] == col[k - 1] + 1) ++runs.back();
      else runs.insert(runs.end(), {k, col[k], 1});
    }
  }
  auto res = torch::empty({nb, chunks, 64}, torch::kUInt8);
  const uint8_t* src = a.packed.data_ptr<uint8_t>();
  uint8_t* dst = res.data_ptr<uint8_t>();
  with_bits(a.bits, a.lbits, [&](auto bits_c, auto lbits_c) {
    constexpr int B = decltype(bits_c)::value, LB = decltype(lbits_c)::value;
    constexpr int64_t PB = 64 * B / LB;  // bits at B bits per word at LB bits
    const int64_t words = kp * LB / 64, srow = kp * B / 64 + 2;  // per row at LB bits; per built row
    // word u of a row = spread(OR of its pieces segs[first[u] .. first[u + 1])); rows are read in bytes [lo, hi)
    std::vector<Seg> segs;
    std::vector<int64_t> first{0};
    int64_t lo = 0, hi = 0;
    size_t j = 0;
    for (int64_t u = 0; u < words; ++u) {
      const int64_t w0 = u * PB, w1 = w0 + PB;  // the word's bits at B bits, as column * B
      while (j < runs.size() && (runs[j + 1] + runs[j + 2]) * B <= w0) j += 3;
      for (size_t t = j; t < runs.size() && runs[t + 1] * B < w1; t += 3) {
        const int64_t d0 = std::max(runs[t + 1] * B, w0), d1 = std::min((runs[t + 1] + runs[t + 2]) * B, w1);
        const int64_t sbit = runs[t] * B + w0 - runs[t + 1] * B;  // stream bit at the word's bit 0
        const int shift = static_cast<int>(sbit & 7);
        const uint64_t mask = (d1 - w0 == 64 ? ~uint64_t(0) : (uint64_t(1) << (d1 - w0)) - 1) & (~uint64_t(0) << (d0 - w0));
        const bool wide = shift > 0 && (mask >> (64 - shift)) != 0;
        segs.push_back({sbit >> 3, shift, wide, mask});
        lo = std::min(lo, sbit >> 3);
        hi = std::max(hi, (sbit >> 3) + (wide ? 9 : 8));
      }
      first.push_back(static_cast<int64_t>(segs.size()));
    }
    const int64_t front = -lo, back = std::max<int64_t>(0, hi - width);  // bytes read around a packed row
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      const int64_t row = std::max(width, srow * 8), span = front + row + back + 8;
      std::vector<uint8_t> zero(span), pads(build ? 0 : 16 * span);  // a zero row; copies of rows at the ends
      std::vector<uint64_t> built(build ? 16 * srow : 0);
      const uint8_t* rp[16];
      for (int64_t blk = b0; blk < b1; ++blk) {
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t o = blk * 16 + i;
          if (o >= out) {
            rp[i] = zero.data() + front;
          } else if (build) {
            uint64_t* s = built.data() + i * srow;
            std::fill(s, s + srow, 0);
            for (int64_t k = 0; k < n; ++k) set_bits<B>(s, col[k] * B, bits_at(src + o * width, width, k * B) & ((1u << B) - 1));
            rp[i] = reinterpret_cast<const uint8_t*>(s);
          } else if (o * width - front >= 0 && (o + 1) * width + back <= out * width) {
            rp[i] = src + o * width;  // bytes read past the row belong to its neighbours, masked off
          } else {
            uint8_t* p = pads.data() + i * span + front;
            std::memcpy(p, src + o * width, width);
            rp[i] = p;
          }
        }
        uint8_t* w = dst + blk * chunks * 64;
        for (int64_t u = 0; u < words; ++u) {
          u64x4 x[4] = {};  // x[q]: word u of rows 4q .. 4q + 3
          for (int64_t t = first[u]; t < first[u + 1]; ++t) {
            const Seg g = segs[t];
            #pragma GCC unroll 4
            for (int q = 0; q < 4; ++q) {
              const uint8_t* const* r = rp + 4 * q;
              u64x4 y = {load64(r[0] + g.byte), load64(r[1] + g.byte), load64(r[2] + g.byte), load64(r[3] + g.byte)};
              if (g.wide) {
                const u64x4 h = {r[0][g.byte + 8], r[1][g.byte + 8], r[2][g.byte + 8], r[3][g.byte + 8]};
                y = (y >> g.shift) | (h << (64 - g.shift));
              } else {
                y >>= g.shift;
              }
              x[q] |= y & g.mask;
            }
          }
          #pragma GCC unroll 4
          for (int q = 0; q < 4; ++q) store_tiles(w + 128 * u + 16 * q, to_tiles<LB>(spread<B, LB>(x[q])));
        }
      }
    });
  });
  return res;
}

// layout_packed one code at a time (the first implementation): a reference for tests and benchmarks.
torch::Tensor layout_packed_scalar(torch::Tensor packed_in, int64_t bits_in, int64_t n_in, torch::Tensor cols_in,
                                   int64_t in_in, int64_t lbits_in) {
  const LayoutArgs a = layout_args(packed_in, bits_in, n_in, cols_in, in_in, lbits_in);
  const int64_t n = a.n, width = a.width, out = a.out, nb = a.nb, kp = a.kp, chunks = a.chunks;
  const bool mapped = a.mapped;
  const int64_t* col = mapped ? a.cols.data_ptr<int64_t>() : nullptr;
  auto res = torch::empty({nb, chunks, 64}, torch::kUInt8);
  const uint8_t* src = a.packed.data_ptr<uint8_t>();
  uint8_t* dst = res.data_ptr<uint8_t>();
  with_bits(a.bits, a.lbits, [&](auto bits_c, auto lbits_c) {
    constexpr int B = decltype(bits_c)::value, LB = decltype(lbits_c)::value, PP = 8 / LB;
    at::parallel_for(0, nb, 1, [&](int64_t lo, int64_t hi) {
      std::vector<uint8_t> codes(16 * kp), row(width + 2);
      for (int64_t blk = lo; blk < hi; ++blk) {
        std::fill(codes.begin(), codes.end(), 0);
        for (int64_t i = 0; i < 16 && blk * 16 + i < out; ++i) {  // unpack rows of the block into codes[i][col]
          std::copy(src + (blk * 16 + i) * width, src + (blk * 16 + i + 1) * width, row.begin());  // zero tail kept
          uint8_t* c = codes.data() + i * kp;
          const uint8_t* r = row.data();
          const auto code = [r](int64_t k) -> uint8_t {
            if constexpr (8 % B == 0) {
              return (r[k / (8 / B)] >> ((k % (8 / B)) * B)) & ((1 << B) - 1);
            } else {
              const int64_t bit = k * B;
              const uint32_t two = r[bit >> 3] | (static_cast<uint32_t>(r[(bit >> 3) + 1]) << 8);
              return static_cast<uint8_t>((two >> (bit & 7)) & ((1u << B) - 1));
            }
          };
          if (mapped) {
            for (int64_t k = 0; k < n; ++k) c[col[k]] = code(k);
          } else {
            for (int64_t k = 0; k < n; ++k) c[k] = code(k);
          }
        }
        uint8_t* w = dst + blk * chunks * 64;  // byte 4 * o + j of chunk q holds tile p's code [o][4 * (q * P + p) + j]
        for (int64_t q = 0; q < chunks; ++q)
          for (int64_t i = 0; i < 16; ++i) {
            const uint8_t* c = codes.data() + i * kp + q * PP * 4;
            for (int64_t j = 0; j < 4; ++j) {
              uint8_t v = 0;
              for (int p = 0; p < PP; ++p) v |= static_cast<uint8_t>(c[p * 4 + j] << (LB * p));
              w[q * 64 + 4 * i + j] = v;
            }
          }
      }
    });
  });
  return res;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layout_packed", &layout_packed, "the tile layout straight from pack.py's packed codes (lowbit_cpu.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("layout_packed_scalar", &layout_packed_scalar, "layout_packed one code at a time (reference)",
        py::call_guard<py::gil_scoped_release>());
  m.def("sgmv", &sgmv, "y[s:t, c:c+out] += x[s:t] @ delta^T for low-bit deltas in the tile layout (lowbit_cpu.py)",
        py::call_guard<py::gil_scoped_release>());
}
