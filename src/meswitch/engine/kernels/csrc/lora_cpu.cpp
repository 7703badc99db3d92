// The LoRA SGMV kernel of meswitch.engine.kernels.lora_cpu (see its docstring).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// 8 16-bit values (fp16 or bf16) -> 8 floats
template <bool BF16> inline __m256 load8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  else return _mm256_cvtph_ps(v);
}

template <bool BF16> inline float load1(uint16_t h) {
  if constexpr (BF16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    return _cvtsh_ss(h);
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// lane j of the result: the sum of the 8 lanes of v[j]
inline __m256 hsum8(const __m256* v) {
  __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
  __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
  __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);  // lanes: 0 1 2 3 | 0 1 2 3 of halves
  __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
  return _mm256_add_ps(lo, hi);
}

// sum_i w[i] * x[i] over n values, w 16 bit, x float
template <bool BF16> inline float dot(const uint16_t* w, const float* x, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(load8<BF16>(w + i), _mm256_loadu_ps(x + i), acc0);
    acc1 = _mm256_fmadd_ps(load8<BF16>(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8<BF16>(w + i), _mm256_loadu_ps(x + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += load1<BF16>(w[i]) * x[i];
  return s;
}

// y[o] += sum_k b[o, k] * h[k] for o < out (b: [out, r] 16 bit, h: [r] float)
template <bool BF16> void expand(const uint16_t* b, const float* h, int64_t out, int64_t r, float* y) {
  int64_t o = 0;
  if (r % 8 == 0) {
    for (; o + 8 <= out; o += 8) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t k = 0; k < r; k += 8) {
        __m256 hk = _mm256_loadu_ps(h + k);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(load8<BF16>(b + (o + j) * r + k), hk, acc[j]);
      }
      _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), hsum8(acc)));
    }
  }
  for (; o < out; ++o) y[o] += dot<BF16>(b + o * r, h, r);
}

// one item: rows [s, t) of x (row stride ldx) -> columns [c, c + out) of y (row stride ldy)
template <bool BF16> void item(const float* x, int64_t ldx, float* y, int64_t ldy, const uint16_t* a,
                               const uint16_t* b, int64_t r, int64_t in, int64_t out, float scale,
                               int64_t s, int64_t t, int64_t c) {
  std::vector<float> h(r);
  for (int64_t row = s; row < t; ++row) {
    const float* xr = x + row * ldx;
    for (int64_t k = 0; k < r; ++k) h[k] = dot<BF16>(a + k * in, xr, in) * scale;
    expand<BF16>(b, h.data(), out, r, y + row * ldy + c);
  }
}

}  // namespace

void sgmv(torch::Tensor x, torch::Tensor y, std::vector<torch::Tensor> as, std::vector<torch::Tensor> bs,
          std::vector<double> scales, std::vector<int64_t> starts, std::vector<int64_t> ends,
          std::vector<int64_t> columns) {
  const int64_t n = static_cast<int64_t>(as.size());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "x: float32 [T, in], unit column stride");
  TORCH_CHECK(y.scalar_type() == torch::kFloat32 && y.dim() == 2 && y.stride(1) == 1, "y: float32 [T, N], unit column stride");
  TORCH_CHECK(bs.size() == as.size() && scales.size() == as.size() && starts.size() == as.size() &&
              ends.size() == as.size() && columns.size() == as.size(), "one a, b, scale, start, end, column per item");
  for (int64_t i = 0; i < n; ++i) {
    const auto& a = as[i];
    const auto& b = bs[i];
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.is_contiguous() && b.is_contiguous(), "factors: contiguous 2-d");
    TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                (a.scalar_type() == torch::kFloat16 || a.scalar_type() == torch::kBFloat16), "factors: fp16 or bf16, alike");
    TORCH_CHECK(b.size(1) == a.size(0) && a.size(1) == x.size(1), "a: [r, in], b: [out, r]");
    TORCH_CHECK(0 <= starts[i] && starts[i] <= ends[i] && ends[i] <= x.size(0) && ends[i] <= y.size(0), "rows");
    TORCH_CHECK(0 <= columns[i] && columns[i] + b.size(0) <= y.size(1), "columns");
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const auto& a = as[i];
      const auto& b = bs[i];
      auto pa = reinterpret_cast<const uint16_t*>(a.data_ptr());
      auto pb = reinterpret_cast<const uint16_t*>(b.data_ptr());
      auto args = std::make_tuple(xp, x.stride(0), yp, y.stride(0), pa, pb, a.size(0), a.size(1), b.size(0),
                                  static_cast<float>(scales[i]), starts[i], ends[i], columns[i]);
      if (a.scalar_type() == torch::kBFloat16) std::apply(item<true>, args);
      else std::apply(item<false>, args);
    }
  });
}
