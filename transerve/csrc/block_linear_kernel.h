// The fused block-linear loop, written once over a vector ISA. Each ISA's translation unit includes this
// inside its own namespace (so the two builds never merge at link time), after defining `Vec`: LANES floats
// per register, PER_BLOCK = 32 / LANES registers per block, its zero/broadcast/loadu/storeu/add/mul/fmadd/hsum,
// and load_block<L> (a block's 32 values q, from their first byte, in element order).
// Up to FUSED_ROWS rows of x, per block and row: y += d * (q . x) + m * sum(x), the sums of x taken once per
// call; more rows: each weight row dequantized once and dotted with every row of x.

// acc[r] += d * (q . x[r]) and mins[r] += minimum * sum(x[r]) for block g and ROWS rows of x.
template <Layout L, int ROWS>
inline __attribute__((always_inline)) void add_block(const float* x, int64_t k, const float* x_sums, int64_t groups,
                                                     const uint8_t* block, int64_t g, typename Vec::T* acc,
                                                     float* mins) {
  const float* dm = reinterpret_cast<const float*>(block);
  typename Vec::T v[Vec::PER_BLOCK];
  Vec::template load_block<L>(block + (L == Layout::NIBBLES ? 8 : 4), v);
  const typename Vec::T scale = Vec::broadcast(dm);
  for (int r = 0; r < ROWS; ++r) {
    const float* xb = x + r * k + g * BLOCK;
    typename Vec::T dot = Vec::mul(v[0], Vec::loadu(xb));
    for (int j = 1; j < Vec::PER_BLOCK; ++j) dot = Vec::fmadd(v[j], Vec::loadu(xb + j * Vec::LANES), dot);
    acc[r] = Vec::fmadd(scale, dot, acc[r]);
    if constexpr (L == Layout::NIBBLES) mins[r] += dm[1] * x_sums[r * groups + g];
  }
}

// y[r, n] for ROWS rows of x and output rows [n0, n1): one pass over those rows of blocks.
template <Layout L, int ROWS>
void rows_pass(const float* x, int64_t k, const uint8_t* weight, const float* x_sums, int64_t n0, int64_t n1,
               float* y, int64_t n_out) {
  const int64_t groups = k / BLOCK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = weight + n * groups * block_bytes(L);
    // Two sums per row, even and odd blocks: one chain would leave a single row latency bound.
    typename Vec::T even[ROWS], odd[ROWS];
    float mins[ROWS];
    for (int r = 0; r < ROWS; ++r) even[r] = odd[r] = Vec::zero(), mins[r] = 0.0f;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      // The weights stream from memory once per step: fetching 1 KB ahead measured 20-30% faster than
      // the hardware prefetcher alone.
      _mm_prefetch(reinterpret_cast<const char*>(row + g * block_bytes(L)) + 1024, _MM_HINT_T0);
      add_block<L, ROWS>(x, k, x_sums, groups, row + g * block_bytes(L), g, even, mins);
      add_block<L, ROWS>(x, k, x_sums, groups, row + (g + 1) * block_bytes(L), g + 1, odd, mins);
    }
    if (g < groups) add_block<L, ROWS>(x, k, x_sums, groups, row + g * block_bytes(L), g, even, mins);
    for (int r = 0; r < ROWS; ++r) y[r * n_out + n] = Vec::hsum(Vec::add(even[r], odd[r])) + mins[r];
  }
}

// Weight row n dequantized into w (k floats).
template <Layout L>
inline void dequantize_row(const uint8_t* weight, int64_t n, int64_t k, float* w) {
  const int64_t groups = k / BLOCK;
  const uint8_t* row = weight + n * groups * block_bytes(L);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* block = row + g * block_bytes(L);
    const float* dm = reinterpret_cast<const float*>(block);
    typename Vec::T v[Vec::PER_BLOCK];
    Vec::template load_block<L>(block + (L == Layout::NIBBLES ? 8 : 4), v);
    for (int j = 0; j < Vec::PER_BLOCK; ++j) {
      typename Vec::T wj = Vec::mul(v[j], Vec::broadcast(dm));
      if constexpr (L == Layout::NIBBLES) wj = Vec::add(wj, Vec::broadcast(dm + 1));
      Vec::storeu(w + g * BLOCK + j * Vec::LANES, wj);
    }
  }
}

// y[r..r+XR, n..n+NW] from NW dequantized weight rows (w, w + k) and XR rows of x: each load feeds NW * XR
// products (8 sums, 2 weights and a row of x: 11 of AVX2's 16 registers).
template <int NW, int XR>
inline void dot_tile(const float* w, const float* x, int64_t k, int64_t r, int64_t n, float* y, int64_t n_out) {
  typename Vec::T acc[NW][XR];
  for (int a = 0; a < NW; ++a)
    for (int j = 0; j < XR; ++j) acc[a][j] = Vec::zero();
  for (int64_t i = 0; i < k; i += Vec::LANES) {
    typename Vec::T wi[NW];
    for (int a = 0; a < NW; ++a) wi[a] = Vec::loadu(w + a * k + i);
    for (int j = 0; j < XR; ++j) {
      const typename Vec::T xj = Vec::loadu(x + (r + j) * k + i);
      for (int a = 0; a < NW; ++a) acc[a][j] = Vec::fmadd(wi[a], xj, acc[a][j]);
    }
  }
  for (int a = 0; a < NW; ++a)
    for (int j = 0; j < XR; ++j) y[(r + j) * n_out + n + a] = Vec::hsum(acc[a][j]);
}

template <int NW>
inline void dot_rows(const float* w, const float* x, int64_t rows, int64_t k, int64_t n, float* y, int64_t n_out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_tile<NW, 4>(w, x, k, r, n, y, n_out);
  for (; r < rows; ++r) dot_tile<NW, 1>(w, x, k, r, n, y, n_out);
}

// Many rows of x: weight rows are dequantized once, two at a time, into `w` (2k floats, in L1) and dotted
// with every row of x, instead of decoding the weights once per pass of four rows.
template <Layout L>
void rows_dequantized(const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n0, int64_t n1,
                      float* y, int64_t n_out, float* w) {
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    dequantize_row<L>(weight, n, k, w);
    dequantize_row<L>(weight, n + 1, k, w + k);
    dot_rows<2>(w, x, rows, k, n, y, n_out);
  }
  if (n < n1) {
    dequantize_row<L>(weight, n, k, w);
    dot_rows<1>(w, x, rows, k, n, y, n_out);
  }
}

// Rows of x in passes of up to 4 (with 16 registers: 8 sums, the block's values and its scale).
template <Layout L>
void linear_rows(const float* x, int64_t rows, int64_t k, const uint8_t* weight, const float* x_sums, int64_t n0,
                 int64_t n1, float* y, int64_t n_out) {
  const int64_t groups = k / BLOCK;
  for (int64_t r = 0; r < rows;) {
    const int64_t left = rows - r;
    const float* xr = x + r * k;
    const float* sr = x_sums + r * groups;
    float* yr = y + r * n_out;
    if (left >= 4) {
      rows_pass<L, 4>(xr, k, weight, sr, n0, n1, yr, n_out), r += 4;
    } else if (left >= 2) {
      rows_pass<L, 2>(xr, k, weight, sr, n0, n1, yr, n_out), r += 2;
    } else {
      rows_pass<L, 1>(xr, k, weight, sr, n0, n1, yr, n_out), r += 1;
    }
  }
}

// Up to FUSED_ROWS rows: the fused passes; more: rows_dequantized, with `w` a buffer of 2k floats.
inline void linear_rows_any(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight,
                            const float* x_sums, int64_t n0, int64_t n1, float* y, int64_t n_out, float* w) {
  if (rows > FUSED_ROWS && l == Layout::NIBBLES)
    rows_dequantized<Layout::NIBBLES>(x, rows, k, weight, n0, n1, y, n_out, w);
  else if (rows > FUSED_ROWS)
    rows_dequantized<Layout::BYTES>(x, rows, k, weight, n0, n1, y, n_out, w);
  else if (l == Layout::NIBBLES)
    linear_rows<Layout::NIBBLES>(x, rows, k, weight, x_sums, n0, n1, y, n_out);
  else
    linear_rows<Layout::BYTES>(x, rows, k, weight, x_sums, n0, n1, y, n_out);
}
