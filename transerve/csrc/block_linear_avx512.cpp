// The AVX-512 build of block_linear_kernel.h: 16 floats a register, half the conversions and products of AVX2.
// Only called where the CPU has AVX-512 F and BW (block_linear.cpp checks at run time).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "block_formats.h"

namespace transerve_blocks {
namespace avx512 {

struct Vec {
  using T = __m512;
  static constexpr int LANES = 16, MAX_ACC = 16, MAX_ROWS = 16;  // 16 sums of 32 registers
  static T zero() { return _mm512_setzero_ps(); }
  static T broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static void storeu(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T load_half(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void load_nibbles(const uint8_t* p, T& lo, T& hi) {
    const __m512i raw = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(raw, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(raw, 4));
  }
  static T load_bytes(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

#include "block_linear_kernel.h"

}  // namespace avx512

void linear_tiles_avx512(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n_out,
                         int64_t t0, int64_t t1, float* y) {
  avx512::linear_tiles_any(l, x, rows, k, weight, n_out, t0, t1, y);
}

}  // namespace transerve_blocks
