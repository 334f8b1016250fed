// Plain C functions over host float32 arrays (no MXNet), called through ctypes by qgraph/native.py.
// ctypes releases the GIL for the whole call, so a batch of arrays is one call that can run on a
// background thread beside Python (qgraph/background.py); numpy would take the GIL back after
// every array.
//
// qgraph_scale_rows: dst[i][r, :] = src[i][r, :] * scale[i][r] for each row-major (rows, row_len)
// array i: BatchNorm folding's W * s per output channel, one float32 multiply per element, as
// numpy's np.multiply(W, s.astype(float32)) computes it (the same bits).
//
// qgraph_find_nonfinite: checks chunks for a NaN or an Inf (an exponent of all ones), taking the
// next chunk from *next until none is left, and lowers *first (which starts at count) to the
// index of a chunk holding one. Several threads may run it on the same chunks at once (the
// caller's thread helps the background one: qgraph/io.py), so *next and *first are atomic.
#include <cstdint>
#include <cstring>

extern "C" {

__attribute__((visibility("default")))
void qgraph_scale_rows(int64_t count, const float* const* src, float* const* dst, const float* const* scale,
                       const int64_t* rows, const int64_t* row_len) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = row_len[i];
    for (int64_t r = 0; r < rows[i]; ++r) {
      const float factor = scale[i][r];
      const float* in = src[i] + r * n;
      float* out = dst[i] + r * n;
      for (int64_t j = 0; j < n; ++j) out[j] = in[j] * factor;
    }
  }
}

__attribute__((visibility("default")))
void qgraph_find_nonfinite(int64_t count, const float* const* src, const int64_t* size, int64_t* next,
                           int64_t* first) {
  constexpr uint32_t exponent = 0x7f800000u;
  for (;;) {
    const int64_t i = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
    if (i >= count) return;
    if (i > __atomic_load_n(first, __ATOMIC_RELAXED)) continue;  // an earlier chunk has one
    const float* values = src[i];
    uint32_t top = 0;  // the largest exponent field: a max vectorizes, an early exit would not
    for (int64_t j = 0; j < size[i]; ++j) {
      uint32_t bits;
      std::memcpy(&bits, values + j, sizeof bits);
      bits &= exponent;
      top = top > bits ? top : bits;
    }
    if (top != exponent) continue;
    int64_t seen = __atomic_load_n(first, __ATOMIC_RELAXED);
    while (i < seen && !__atomic_compare_exchange_n(first, &seen, i, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
  }
}

}  // extern "C"
