// Linears over GGUF's block-quantized weights on CPU, dequantization fused into the product.
//
// The weights are a GGUF tensor's Q4_0, Q4_1 or Q8_0 blocks in tiles of 16 output rows
// (block_formats.h). Activations stay float32 and each weight is dequantized exactly, so the product is
// float32's with the file's own weights, up to summation order.
// This file: the AVX2 build of the loop (block_linear_kernel.h), dequantization, and the torch ops, which
// take the AVX-512 build (block_linear_avx512.cpp) where the CPU has it. Built at first use by
// transerve/engine/block_kernels.py, which holds the torch reference of both ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "block_formats.h"

namespace transerve_blocks {
namespace avx2 {

struct Vec {
  using T = __m256;
  static constexpr int LANES = 8, MAX_ACC = 8, MAX_ROWS = 4;  // 8 sums of 16 registers
  static T zero() { return _mm256_setzero_ps(); }
  static T broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static void storeu(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T load_half(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static void load_nibbles(const uint8_t* p, T& lo, T& hi) {
    const __m256i raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(raw, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(raw, 4));
  }
  static T load_bytes(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

#include "block_linear_kernel.h"

}  // namespace avx2

Layout layout_of(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 3 && weight.is_contiguous() &&
                  (weight.size(2) == 20 || weight.size(2) == 34),
              "weight: contiguous uint8 [out, in/32, 20 (4-bit) or 34 (8-bit)]");
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
  // Tiles split across threads; a grain of GROUP_TILES (64 outputs) keeps a small linear on one thread.
  at::parallel_for(0, (n_out + TILE - 1) / TILE, GROUP_TILES, [&](int64_t t0, int64_t t1) {
    if (avx512)
      linear_tiles_avx512(l, xp, rows, k, wp, n_out, t0, t1, yp);
    else
      avx2::linear_tiles_any(l, xp, rows, k, wp, n_out, t0, t1, yp);
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
  at::parallel_for(0, (n_out + TILE - 1) / TILE, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (l == Layout::NIBBLES)
        avx2::dequantize_tile<Layout::NIBBLES>(wp, n_out, t, k, op + t * TILE * k);
      else
        avx2::dequantize_tile<Layout::BYTES>(wp, n_out, t, k, op + t * TILE * k);
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
