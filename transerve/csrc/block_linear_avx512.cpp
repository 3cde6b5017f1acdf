// The AVX-512 build of block_linear_kernel.h: 16 floats a register, half the conversions and products of AVX2.
// Only called where the CPU has AVX-512 F and BW (block_linear.cpp checks at run time).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#include <immintrin.h>

#include "block_formats.h"

namespace transerve_blocks {
namespace avx512 {

struct Vec {
  using T = __m512;
  static constexpr int LANES = 16, PER_BLOCK = 2, MAX_ROWS = 8;  // 16 sums of 32 registers
  static T zero() { return _mm512_setzero_ps(); }
  static T broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static T loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(T v) { return _mm512_reduce_add_ps(v); }
  template <Layout L>
  static void load_block(const uint8_t* q, T v[2]) {
    if constexpr (L == Layout::BYTES) {
      v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
      v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16))));
    } else {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      const __m128i mask = _mm_set1_epi8(0x0F);
      v[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)));
      v[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)));
    }
  }
};

#include "block_linear_kernel.h"

}  // namespace avx512

void linear_rows_avx512(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n0,
                        int64_t n1, float* y, int64_t n_out) {
  avx512::linear_rows_any(l, x, rows, k, weight, n0, n1, y, n_out);
}

}  // namespace transerve_blocks
