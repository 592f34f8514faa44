// Int4 weights times 8-bit activations with AVX-512 VNNI integer dot products, for decode steps
// of a few rows on a CPU (model/kernels.py builds this file and explains why).
//
// Weights come in blocks of 16 outputs, one run of 320 bytes per block and group of 32 inputs,
// the blocks' runs front to back: the codes (4 bits, 0..15) in 256 bytes, then the 16 outputs'
// scales d, then their minimums m, as float16: w = d * code + m (GGUF's Q4_1). In the codes,
// 64-byte vector q (0..3) holds in lane i (4 bytes) the codes of output i for inputs 4q .. 4q+3
// in its low halves, and for inputs 16 + 4q .. 16 + 4q + 3 in its high halves. So one VPDPBUSD
// multiplies 4 inputs, broadcast, with 16 outputs' codes, and the lanes never need adding up.
// Activations are quantized per row and group of 32 to int8 (x ~ dx * xq, symmetric), so a
// group's contribution to an output is d * dx * sum(code * xq) + m * dx * sum(xq).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t kBlock = 16;         // outputs a block
constexpr int64_t kRunBytes = 320;     // a block's bytes a group: codes, scales, minimums
constexpr int64_t kScalesAt = 256, kMinsAt = 288;
constexpr int64_t kTile = 4;           // rows sharing each unpacked group of codes

// Each row's activations as int8 per group of 32: codes, scales, and scale * sum of codes.
void quantize_rows(const float* x, int64_t count, int8_t* xq, float* dx, float* dx_sum) {
  for (int64_t i = 0; i < count; ++i) {  // count: rows * groups
    const __m512 a = _mm512_loadu_ps(x + i * 32), b = _mm512_loadu_ps(x + i * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  // rounds to nearest even
    const __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * 32 + 16), _mm512_cvtepi32_epi8(qb));
    dx[i] = amax / 127.f;
    dx_sum[i] = dx[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
  }
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

// One block of 16 outputs for T rows (a constant, so the accumulators stay in registers): each
// group's codes are unpacked once and serve every row.
template <int T>
void block_rows(const uint8_t* run, int64_t groups, const int8_t* xq, const float* dx, const float* dx_sum,
                float* y, int64_t n) {
  const int64_t k = groups * 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, run += kRunBytes) {
    __m512i codes[8];
#pragma GCC unroll 8
    for (int q = 0; q < 4; ++q) {
      const __m512i both = _mm512_loadu_si512(run + 64 * q);
      codes[q] = _mm512_and_si512(both, low);
      codes[q + 4] = _mm512_and_si512(_mm512_srli_epi16(both, 4), low);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + kScalesAt)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(run + kMinsAt)));
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const int8_t* xg = xq + t * k + g * 32;
      __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int q = 0; q < 8; q += 2) {
        even = _mm512_dpbusd_epi32(even, codes[q], broadcast4(xg + 4 * q));
        odd = _mm512_dpbusd_epi32(odd, codes[q + 1], broadcast4(xg + 4 * q + 4));
      }
      const int64_t i = t * groups + g;
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), _mm512_mul_ps(d, _mm512_set1_ps(dx[i])),
                               acc[t]);
      acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(dx_sum[i]), acc[t]);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + t * n, acc[t]);
}

at::Tensor int4_vnni_linear(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32 [rows, in]");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kByte && weight.is_contiguous() &&
                  weight.size(2) == kRunBytes,
              "weight: contiguous uint8 [out / 16, in / 32, 320]");
  const int64_t rows = x.size(0), k = x.size(1), blocks = weight.size(0), groups = weight.size(1), n = blocks * kBlock;
  TORCH_CHECK(k == groups * 32, "x's features (", k, ") are not the weight's inputs (", groups * 32, ")");
  at::Tensor xq = at::empty({rows, k}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({rows, groups}, x.options());
  at::Tensor dx_sum = at::empty({rows, groups}, x.options());
  quantize_rows(x.data_ptr<float>(), rows * groups, xq.data_ptr<int8_t>(), dx.data_ptr<float>(), dx_sum.data_ptr<float>());
  at::Tensor y = at::empty({rows, n}, x.options());

  const uint8_t* w = weight.data_ptr<uint8_t>();
  const int8_t* xq_p = xq.data_ptr<int8_t>();
  const float* dx_p = dx.data_ptr<float>();
  const float* dx_sum_p = dx_sum.data_ptr<float>();
  float* y_p = y.data_ptr<float>();
  at::parallel_for(0, blocks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint8_t* run = w + b * groups * kRunBytes;
      for (int64_t r = 0; r < rows; r += kTile) {
        const int8_t* xr = xq_p + r * k;
        const float* dr = dx_p + r * groups;
        const float* sr = dx_sum_p + r * groups;
        float* yr = y_p + r * n + b * kBlock;
        switch (std::min(kTile, rows - r)) {
          case 1: block_rows<1>(run, groups, xr, dr, sr, yr, n); break;
          case 2: block_rows<2>(run, groups, xr, dr, sr, yr, n); break;
          case 3: block_rows<3>(run, groups, xr, dr, sr, yr, n); break;
          default: block_rows<4>(run, groups, xr, dr, sr, yr, n);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(loupe_kernels, lib) {
  lib.def("int4_vnni_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(loupe_kernels, CPU, lib) {
  lib.impl("int4_vnni_linear", &int4_vnni_linear);
}
