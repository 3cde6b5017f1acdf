// The weight layout the kernels read, shared by every ISA's build (plain C++, no vector code).
//
// GGUF's Q4_0, Q4_1 and Q8_0 blocks of 32 weights, the file's own bytes regrouped per output row: first the row's
// float16 scales (each block's d and m for the 4-bit formats, d for Q8_0), then its values. So a row streams as
// many bytes as the file holds (20 or 34 a block), and its scales widen to float32 once per row (one F16C
// conversion for 8 of them) instead of once per block and row of x.
//   NIBBLES (Q4_0, Q4_1): per block float16 d, m, then 16 bytes of 4-bit q (element j in the low nibble of byte j,
//                         element j + 16 in the high one); w = d * q + m (Q4_0: m = -8d, exact).
//   BYTES (Q8_0):         per block float16 d, then 32 int8 q; w = d * q.
// d * q is exact in float32 (11 + 8 significant bits at most), so fma(q, d, m) rounds once, as d * q + m does.
#pragma once
#include <cstdint>

namespace transerve_blocks {

constexpr int64_t BLOCK = 32;
enum class Layout { NIBBLES = 4, BYTES = 8 };

constexpr int64_t block_bytes(Layout l) { return l == Layout::NIBBLES ? 20 : 34; }
constexpr int64_t scale_count(Layout l) { return l == Layout::NIBBLES ? 2 : 1; }  // float16 scales a block
constexpr int64_t value_bytes(Layout l) { return block_bytes(l) - 2 * scale_count(l); }
constexpr int64_t MAX_GROUPS = 1024;  // blocks a weight row (32768 inputs): a row's scales are widened on the stack
// y[rows, n0:n1] of x [rows, k] times the weight. The AVX-512 build (block_linear_avx512.cpp).
void linear_rows_avx512(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n0,
                        int64_t n1, float* y, int64_t n_out);

}  // namespace transerve_blocks
