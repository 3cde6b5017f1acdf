// Block layouts the kernels read, shared by every ISA's build (plain C++, no vector code).
//
// GGUF's Q4_0, Q4_1 and Q8_0 blocks of 32 weights, each with its float16 scale (and Q4_1 minimum) widened
// to float32 in front of its values (exact, and broadcast from memory: a float16 scale per block cost
// a conversion and a register broadcast on the shuffle port, the kernel's bottleneck):
//   NIBBLES (Q4_0, Q4_1): float32 d, float32 m, 16 bytes of 4-bit q (element j in the low nibble of byte j,
//                         element j + 16 in the high one); w = d * q + m (Q4_0: m = -8d, exact).
//   BYTES (Q8_0):         float32 d, 32 int8 q; w = d * q.
#pragma once
#include <cstdint>

namespace transerve_blocks {

constexpr int64_t BLOCK = 32;
enum class Layout { NIBBLES = 4, BYTES = 8 };

constexpr int64_t block_bytes(Layout l) { return l == Layout::NIBBLES ? 24 : 36; }
constexpr int64_t FUSED_ROWS = 8;  // more rows of x: each weight row is dequantized once and reused (5-8 rows: fused passes measured ~10% faster)

// y[rows, n0:n1] of x [rows, k] times the weight's blocks; x_sums [rows, k/32], w a buffer of 2k floats.
// The AVX-512 build (block_linear_avx512.cpp).
void linear_rows_avx512(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, const float* x_sums,
                        int64_t n0, int64_t n1, float* y, int64_t n_out, float* w);

}  // namespace transerve_blocks
