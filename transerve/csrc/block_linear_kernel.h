// The fused block-linear loop, written once over a vector ISA. Each ISA's translation unit includes this
// inside its own namespace (so the two builds never merge at link time), after defining `Vec`: LANES floats
// per register, PER_BLOCK = 32 / LANES registers per block, and its zero/set1/loadu/mul/fmadd/hsum and
// load_block<L> (a block's values q in element order; returns its minimum, 0 for Q8_0).
// Per block and row: y += d * (q . x) + minimum * sum(x), the sums of x taken once per call.

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

inline void linear_rows_any(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight,
                            const float* x_sums, int64_t n0, int64_t n1, float* y, int64_t n_out) {
  if (l == Layout::NIBBLES)
    linear_rows<Layout::NIBBLES>(x, rows, k, weight, x_sums, n0, n1, y, n_out);
  else
    linear_rows<Layout::BYTES>(x, rows, k, weight, x_sums, n0, n1, y, n_out);
}
