// The weight layout the kernels read, shared by every ISA's build (plain C++, no vector code).
//
// GGUF's Q4_0, Q4_1 and Q8_0 blocks of 32 weights, the file's own bytes regrouped in tiles of TILE output rows
// (the last tile may be narrower: `width` rows), so that one vector holds the same input's weight for 16 outputs
// and a product needs no horizontal sum. A tile is its blocks group by group (a group: block g of each of its
// rows); a group is the rows' float16 d's, then (4-bit formats) their m's, then the values in chunks: chunk j
// is byte j of each row's block, one byte a row.
//   NIBBLES (Q4_0, Q4_1): 16 chunks; chunk j's low nibbles are element j, its high ones element j + 16;
//                         w = d * q + m (Q4_0: m = -8d, exact).
//   BYTES (Q8_0):         32 chunks of int8 q; w = d * q.
// So a weight streams as many bytes as the file holds (20 or 34 a block and row). d * q is exact in float32
// (11 + 8 significant bits at most), so fma(q, d, m) rounds once, as d * q + m does.
#pragma once
#include <cstdint>

namespace transerve_blocks {

constexpr int64_t BLOCK = 32;
constexpr int64_t TILE = 16;  // output rows a tile
enum class Layout { NIBBLES = 4, BYTES = 8 };

constexpr int64_t block_bytes(Layout l) { return l == Layout::NIBBLES ? 20 : 34; }
constexpr int64_t scale_count(Layout l) { return l == Layout::NIBBLES ? 2 : 1; }  // float16 scales a block
constexpr int64_t chunk_count(Layout l) { return block_bytes(l) - 2 * scale_count(l); }  // value bytes a block
constexpr int64_t GROUP_TILES = 4;  // tiles whose passes run together, so their weights stay in cache between row passes

// Where tile t starts (the tiles before it are full).
constexpr int64_t tile_offset(Layout l, int64_t t, int64_t groups) { return t * TILE * groups * block_bytes(l); }

// y[rows, 16 * t0 : 16 * t1] of x [rows, k] times the weight (n_out rows). The AVX-512 build (block_linear_avx512.cpp).
void linear_tiles_avx512(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n_out,
                         int64_t t0, int64_t t1, float* y);

}  // namespace transerve_blocks
