// The fused block-linear loop, written once over a vector ISA. Each ISA's translation unit includes this
// inside its own namespace (so the two builds never merge at link time), after defining `Vec`: LANES floats a
// register, MAX_ACC sums a pass may keep in registers, MAX_ROWS rows of x a pass at most, and
// zero/broadcast/storeu/mul/fmadd, load_half (LANES float16), load_nibbles and load_bytes (LANES bytes of a
// chunk as floats: both nibbles, or int8).
// A pass multiplies ROWS rows of x by TILES tiles (block_formats.h): per block group, each vector of 16 outputs'
// weights is dequantized in registers once (w = fma(q, d, m)) and multiplied into every row, one broadcast input
// at a time. Each output's sum runs over its inputs in the same order in every pass, so a row's result never
// depends on how many rows or tiles share its pass.

constexpr int64_t PREFETCH_GROUPS = 4;  // block groups ahead the weights are fetched

template <Layout L, int TILES, int ROWS>
void tile_pass(const float* x, int64_t k, const uint8_t* tiles, float* y, int64_t n_out) {
  using T = typename Vec::T;
  constexpr int V = TILE / Vec::LANES, NV = TILES * V;
  constexpr int64_t group_bytes = TILE * block_bytes(L);
  const int64_t groups = k / BLOCK, tile_bytes = groups * group_bytes;
  T acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec::zero();
  for (int64_t g = 0; g < groups; ++g) {
    T d[NV], m[NV];
    const uint8_t* values[NV];
    for (int v = 0; v < NV; ++v) {
      const uint8_t* group = tiles + (v / V) * tile_bytes + g * group_bytes;
      const int64_t lane = (v % V) * Vec::LANES;
      d[v] = Vec::load_half(group + 2 * lane);
      if constexpr (L == Layout::NIBBLES) m[v] = Vec::load_half(group + 2 * TILE + 2 * lane);
      values[v] = group + 2 * TILE * scale_count(L) + lane;
    }
    // The weights stream from memory once per step: fetching ahead measured faster than the hardware prefetcher alone.
    if (g + PREFETCH_GROUPS < groups)
      for (int t = 0; t < TILES; ++t)
        for (int64_t byte = 0; byte < group_bytes; byte += 64)
          _mm_prefetch(reinterpret_cast<const char*>(tiles + t * tile_bytes + (g + PREFETCH_GROUPS) * group_bytes + byte), _MM_HINT_T0);
    const float* xg = x + g * BLOCK;
    if constexpr (L == Layout::NIBBLES) {
      for (int j = 0; j < 16; ++j) {
        T lo[NV], hi[NV];
        for (int v = 0; v < NV; ++v) {
          Vec::load_nibbles(values[v] + j * TILE, lo[v], hi[v]);
          lo[v] = Vec::fmadd(lo[v], d[v], m[v]);
          hi[v] = Vec::fmadd(hi[v], d[v], m[v]);
        }
        for (int r = 0; r < ROWS; ++r) {
          const T a = Vec::broadcast(xg + r * k + j), b = Vec::broadcast(xg + r * k + j + 16);
          for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fmadd(hi[v], b, Vec::fmadd(lo[v], a, acc[r][v]));
        }
      }
    } else {
      for (int j = 0; j < 32; ++j) {
        T w[NV];
        for (int v = 0; v < NV; ++v) w[v] = Vec::mul(Vec::load_bytes(values[v] + j * TILE), d[v]);
        for (int r = 0; r < ROWS; ++r) {
          const T a = Vec::broadcast(xg + r * k + j);
          for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fmadd(w[v], a, acc[r][v]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) Vec::storeu(y + r * n_out + v * Vec::LANES, acc[r][v]);
}

// ROWS rows of x times n full tiles: passes of as many tiles as the registers hold sums for.
template <Layout L, int ROWS>
void tiles_of_rows(const float* x, int64_t k, const uint8_t* tiles, int64_t n, float* y, int64_t n_out) {
  constexpr int V = TILE / Vec::LANES, FIT = Vec::MAX_ACC / (ROWS * V);
  constexpr int MOST = FIT >= 4 ? 4 : FIT >= 2 ? 2 : 1;
  const int64_t tile_bytes = tile_offset(L, 1, k / BLOCK);
  int64_t t = 0;
  for (; t + MOST <= n; t += MOST) tile_pass<L, MOST, ROWS>(x, k, tiles + t * tile_bytes, y + t * TILE, n_out);
  if constexpr (MOST > 2)
    for (; t + 2 <= n; t += 2) tile_pass<L, 2, ROWS>(x, k, tiles + t * tile_bytes, y + t * TILE, n_out);
  for (; t < n; ++t) tile_pass<L, 1, ROWS>(x, k, tiles + t * tile_bytes, y + t * TILE, n_out);
}

// All rows of x times n full tiles: row passes of MAX_ROWS, 8, 4, 2 and 1 (the tiles stay in cache between them).
template <Layout L>
void row_passes(const float* x, int64_t rows, int64_t k, const uint8_t* tiles, int64_t n, float* y, int64_t n_out) {
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    const float* xr = x + r * k;
    float* yr = y + r * n_out;
    if constexpr (Vec::MAX_ROWS >= 16)
      if (left >= 16) { tiles_of_rows<L, 16>(xr, k, tiles, n, yr, n_out), r += 16; continue; }
    if constexpr (Vec::MAX_ROWS >= 8)
      if (left >= 8) { tiles_of_rows<L, 8>(xr, k, tiles, n, yr, n_out), r += 8; continue; }
    if (left >= 4) {
      tiles_of_rows<L, 4>(xr, k, tiles, n, yr, n_out), r += 4;
    } else if (left >= 2) {
      tiles_of_rows<L, 2>(xr, k, tiles, n, yr, n_out), r += 2;
    } else {
      tiles_of_rows<L, 1>(xr, k, tiles, n, yr, n_out), r += 1;
    }
  }
}

// A narrow tile (`width` rows) copied out to full width, its missing rows' scales and values zero.
template <Layout L>
std::vector<uint8_t> padded_tile(const uint8_t* tile, int64_t width, int64_t groups) {
  std::vector<uint8_t> full(tile_offset(L, 1, groups), 0);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* src = tile + g * width * block_bytes(L);
    uint8_t* dst = full.data() + g * TILE * block_bytes(L);
    for (int64_t s = 0; s < scale_count(L); ++s) std::memcpy(dst + 2 * TILE * s, src + 2 * width * s, 2 * width);
    src += 2 * width * scale_count(L), dst += 2 * TILE * scale_count(L);
    for (int64_t c = 0; c < chunk_count(L); ++c) std::memcpy(dst + c * TILE, src + c * width, width);
  }
  return full;
}

// y[:, 16 * t0 : min(16 * t1, n_out)] for tiles t0..t1 of the weight.
template <Layout L>
void linear_tiles(const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n_out, int64_t t0,
                  int64_t t1, float* y) {
  const int64_t groups = k / BLOCK, full = std::min(t1, n_out / TILE);
  for (int64_t t = t0; t < full; t += GROUP_TILES)
    row_passes<L>(x, rows, k, weight + tile_offset(L, t, groups), std::min(GROUP_TILES, full - t), y + t * TILE, n_out);
  const int64_t width = n_out - full * TILE;
  if (full < t1 && width > 0) {
    const std::vector<uint8_t> tile = padded_tile<L>(weight + tile_offset(L, full, groups), width, groups);
    std::vector<float> out(rows * TILE);
    row_passes<L>(x, rows, k, tile.data(), 1, out.data(), TILE);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(y + r * n_out + full * TILE, out.data() + r * TILE, width * sizeof(float));
  }
}

inline void linear_tiles_any(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n_out,
                             int64_t t0, int64_t t1, float* y) {
  if (l == Layout::NIBBLES)
    linear_tiles<Layout::NIBBLES>(x, rows, k, weight, n_out, t0, t1, y);
  else
    linear_tiles<Layout::BYTES>(x, rows, k, weight, n_out, t0, t1, y);
}

// Tile t's rows dequantized into w (its rows of k floats).
template <Layout L>
void dequantize_tile(const uint8_t* weight, int64_t n_out, int64_t t, int64_t k, float* w) {
  const int64_t groups = k / BLOCK, width = std::min(TILE, n_out - t * TILE);
  const uint8_t* stored = weight + tile_offset(L, t, groups);
  std::vector<uint8_t> padded;
  if (width < TILE) padded = padded_tile<L>(stored, width, groups), stored = padded.data();
  constexpr int V = TILE / Vec::LANES;
  float block[BLOCK][TILE];  // [element][row]
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* group = stored + g * TILE * block_bytes(L);
    for (int v = 0; v < V; ++v) {
      const int64_t lane = v * Vec::LANES;
      const typename Vec::T d = Vec::load_half(group + 2 * lane);
      const uint8_t* values = group + 2 * TILE * scale_count(L) + lane;
      if constexpr (L == Layout::NIBBLES) {
        const typename Vec::T m = Vec::load_half(group + 2 * TILE + 2 * lane);
        for (int j = 0; j < 16; ++j) {
          typename Vec::T lo, hi;
          Vec::load_nibbles(values + j * TILE, lo, hi);
          Vec::storeu(block[j] + lane, Vec::fmadd(lo, d, m));
          Vec::storeu(block[j + 16] + lane, Vec::fmadd(hi, d, m));
        }
      } else {
        for (int j = 0; j < 32; ++j) Vec::storeu(block[j] + lane, Vec::mul(Vec::load_bytes(values + j * TILE), d));
      }
    }
    for (int64_t row = 0; row < width; ++row)
      for (int64_t e = 0; e < BLOCK; ++e) w[row * k + g * BLOCK + e] = block[e][row];
  }
}
