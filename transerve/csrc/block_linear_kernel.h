// The fused block-linear loop, written once over a vector ISA. Each ISA's translation unit includes this
// inside its own namespace (so the two builds never merge at link time), after defining `Vec`: LANES floats
// per register, PER_BLOCK = 32 / LANES registers per block, MAX_ROWS rows of x a pass (two sums each beside a
// block's registers), its zero/broadcast/loadu/storeu/add/mul/fmadd/hsum, and load_block<L> (a block's 32 values q as
// floats, from their first byte, in element order).
// Per weight row: its scales widened to float32 once; per block, the 32 weights dequantized in registers once
// (w = fma(q, d, m)) and multiplied into up to MAX_ROWS rows of x.

// The row's float16 scales as float32 (`count` of them).
inline void widen_scales(const uint8_t* row, int64_t count, float* out) {
  const uint16_t* half = reinterpret_cast<const uint16_t*>(row);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half + i))));
  for (; i < count; ++i) out[i] = _cvtsh_ss(half[i]);
}

// Weight row n's values, its float16 scales widened into `scales` (2 * MAX_GROUPS floats).
template <Layout L>
inline const uint8_t* row_values(const uint8_t* weight, int64_t n, int64_t groups, float* scales) {
  const uint8_t* row = weight + n * groups * block_bytes(L);
  widen_scales(row, groups * scale_count(L), scales);
  return row + groups * 2 * scale_count(L);
}

// Block g's 32 weights, dequantized, in w.
template <Layout L>
inline __attribute__((always_inline)) void dequantize_block(const uint8_t* values, const float* scales, int64_t g,
                                                            typename Vec::T* w) {
  Vec::template load_block<L>(values + g * value_bytes(L), w);
  const typename Vec::T d = Vec::broadcast(scales + g * scale_count(L));
  if constexpr (L == Layout::NIBBLES) {
    const typename Vec::T m = Vec::broadcast(scales + 2 * g + 1);
    for (int j = 0; j < Vec::PER_BLOCK; ++j) w[j] = Vec::fmadd(w[j], d, m);
  } else {
    for (int j = 0; j < Vec::PER_BLOCK; ++j) w[j] = Vec::mul(w[j], d);
  }
}

// y[r * n_out] = w . x[r] for ROWS rows of x and one weight row (its values and widened scales). Each row of x
// keeps two sums (a block's even and odd registers): two chains hide some of the FMA's latency, and the order of
// the sums is the same in every pass, so a row's result never depends on how many rows share its pass.
template <Layout L, int ROWS>
void dot_rows(const float* x, int64_t k, const uint8_t* values, const float* scales, float* y, int64_t n_out) {
  typename Vec::T acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = Vec::zero();
  const int64_t groups = k / BLOCK;
  for (int64_t g = 0; g < groups; ++g) {
    // The weights stream from memory once per step: fetching ahead measured 20-30% faster than the hardware
    // prefetcher alone.
    _mm_prefetch(reinterpret_cast<const char*>(values + g * value_bytes(L)) + 1024, _MM_HINT_T0);
    typename Vec::T w[Vec::PER_BLOCK];
    dequantize_block<L>(values, scales, g, w);
    for (int r = 0; r < ROWS; ++r) {
      const float* xb = x + r * k + g * BLOCK;
      for (int j = 0; j < Vec::PER_BLOCK; ++j) acc[r][j % 2] = Vec::fmadd(w[j], Vec::loadu(xb + j * Vec::LANES), acc[r][j % 2]);
    }
  }
  for (int r = 0; r < ROWS; ++r) y[r * n_out] = Vec::hsum(Vec::add(acc[r][0], acc[r][1]));
}

// y[:, n0:n1]: per weight row, passes of MAX_ROWS (8 with AVX-512's 32 registers, 4 with AVX2's 16), 4, 2 and 1
// rows of x (the weight row stays in L1 between them).
template <Layout L>
void linear_rows(const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n0, int64_t n1, float* y,
                 int64_t n_out) {
  const int64_t groups = k / BLOCK;
  float scales[2 * MAX_GROUPS];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* values = row_values<L>(weight, n, groups, scales);
    for (int64_t r = 0; r < rows;) {
      const int64_t left = rows - r;
      const float* xr = x + r * k;
      float* yr = y + r * n_out + n;
      if (left >= Vec::MAX_ROWS) {
        dot_rows<L, Vec::MAX_ROWS>(xr, k, values, scales, yr, n_out), r += Vec::MAX_ROWS;
      } else if (left >= 4) {
        dot_rows<L, 4>(xr, k, values, scales, yr, n_out), r += 4;
      } else if (left >= 2) {
        dot_rows<L, 2>(xr, k, values, scales, yr, n_out), r += 2;
      } else {
        dot_rows<L, 1>(xr, k, values, scales, yr, n_out), r += 1;
      }
    }
  }
}

// Weight row n dequantized into w (k floats).
template <Layout L>
inline void dequantize_row(const uint8_t* weight, int64_t n, int64_t k, float* w) {
  const int64_t groups = k / BLOCK;
  float scales[2 * MAX_GROUPS];
  const uint8_t* values = row_values<L>(weight, n, groups, scales);
  for (int64_t g = 0; g < groups; ++g) {
    typename Vec::T v[Vec::PER_BLOCK];
    dequantize_block<L>(values, scales, g, v);
    for (int j = 0; j < Vec::PER_BLOCK; ++j) Vec::storeu(w + g * BLOCK + j * Vec::LANES, v[j]);
  }
}

inline void linear_rows_any(Layout l, const float* x, int64_t rows, int64_t k, const uint8_t* weight, int64_t n0,
                            int64_t n1, float* y, int64_t n_out) {
  if (l == Layout::NIBBLES)
    linear_rows<Layout::NIBBLES>(x, rows, k, weight, n0, n1, y, n_out);
  else
    linear_rows<Layout::BYTES>(x, rows, k, weight, n0, n1, y, n_out);
}
