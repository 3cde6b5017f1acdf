// Linears over GGUF's block-quantized weights on CPU, dequantization fused into the product.
//
// The weights are a GGUF tensor's Q4_0, Q4_1 or Q8_0 blocks, each output row's scales in front of its values
// (block_formats.h). Activations stay float32 and each weight is dequantized exactly, so the product is
// float32's with the file's own weights, up to summation order.
// This file: the AVX2 build of the loop (block_linear_kernel.h), dequantization, and the torch ops, which
// take the AVX-512 build (block_linear_avx512.cpp) where the CPU has it. Built at first use by
// transerve/engine/block_kernels.py, which holds the torch reference of both ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "block_formats.h"

namespace transerve_blocks {
namespace avx2 {

struct Vec {
  using T = __m256;
  static constexpr int LANES = 8, PER_BLOCK = 4, MAX_ROWS = 4;  // 8 sums of 16 registers
  static T zero() { return _mm256_setzero_ps(); }
  static T broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  template <Layout L>
  static void load_block(const uint8_t* q, T v[4]) {
    if constexpr (L == Layout::BYTES) {
      for (int j = 0; j < 4; ++j)
        v[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * j))));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      const __m128i mask = _mm_set1_epi8(0x0F);
      const __m128i lo = _mm_and_si128(raw, mask);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
      v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
    }
  }
};

#include "block_linear_kernel.h"

}  // namespace avx2

Layout layout_of(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 3 && weight.is_contiguous() &&
                  (weight.size(2) == 20 || weight.size(2) == 34) && weight.size(1) <= MAX_GROUPS,
              "weight: contiguous uint8 [out, in/32 (at most 1024), 20 (4-bit) or 34 (8-bit)]");
  return weight.size(2) == 20 ? Layout::NIBBLES : Layout::BYTES;
}

// x float32 [rows, in] times the weight's blocks [out, in/32, block bytes] -> float32 [rows, out].
at::Tensor block_linear(const at::Tensor& x, const at::Tensor& weight) {
  const Layout l = layout_of(weight);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [rows, in]");
  const int64_t rows = x.size(0), k = x.size(1), n_out = weight.size(0), groups = weight.size(1);
  TORCH_CHECK(k == groups * BLOCK, "x has ", k, " inputs, the weight ", groups * BLOCK);
  at::Tensor y = at::empty({rows, n_out}, x.options());
  if (rows == 0 || n_out == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // TRANSERVE_CPU_ISA=avx2 keeps the AVX2 build on an AVX-512 CPU (tests check both builds on one machine).
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             !(std::getenv("TRANSERVE_CPU_ISA") && std::string(std::getenv("TRANSERVE_CPU_ISA")) == "avx2");
  // Output rows split across threads; a grain of 64 keeps a small linear on one thread.
  at::parallel_for(0, n_out, 64, [&](int64_t n0, int64_t n1) {
    if (avx512)
      linear_rows_avx512(l, xp, rows, k, wp, n0, n1, yp, n_out);
    else
      avx2::linear_rows_any(l, xp, rows, k, wp, n0, n1, yp, n_out);
  });
  return y;
}

// The float32 weight [out, in], as the gguf package dequantizes, bit for bit: d * q + m (Q4_0's (q - 8) * d is
// exact either way), d * q.
at::Tensor block_dequantize(const at::Tensor& weight) {
  const Layout l = layout_of(weight);
  const int64_t n_out = weight.size(0), groups = weight.size(1);
  at::Tensor out = at::empty({n_out, groups * BLOCK}, weight.options().dtype(at::kFloat));
  const uint8_t* wp = weight.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t k = groups * BLOCK;
  at::parallel_for(0, n_out, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      if (l == Layout::NIBBLES)
        avx2::dequantize_row<Layout::NIBBLES>(wp, n, k, op + n * k);
      else
        avx2::dequantize_row<Layout::BYTES>(wp, n, k, op + n * k);
    }
  });
  return out;
}

}  // namespace transerve_blocks

TORCH_LIBRARY(transerve_blocks, m) {
  m.def("block_linear(Tensor x, Tensor weight) -> Tensor");
  m.def("block_dequantize(Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(transerve_blocks, CPU, m) {
  m.impl("block_linear", &transerve_blocks::block_linear);
  m.impl("block_dequantize", &transerve_blocks::block_dequantize);
}
