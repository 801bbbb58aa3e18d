// The CPU LoRA step of a decode batch: for each adapter group, shrink its tokens over the stacked A
// rows, then expand each part into its columns of out. Built on first use by cpu_extension.py.
//
// Why C++: a decode step over 38 adapters is about 7,000 products of 1-2 rows with rank-8..64
// matrices; as torch ops each one pays dispatch and MKL setup (about 8 us in TorchScript), more than
// its arithmetic. Here one call does a whole projection, and the products are plain loops that the
// compiler vectorizes. fp32 only; sums are in fp32 in a fixed order (not bit-identical to MKL).
#include <ATen/Parallel.h>

#include <vector>

#include "ops.h"

namespace tandem {
namespace {

// The common ranks at compile time: the short dot products of the expand unroll fully.
template <int R>
inline float dot_fixed(const float* a, const float* b) {
  constexpr int L = R < kLanes ? R : kLanes;
  float acc[L] = {0};
  for (int i = 0; i < R; i += L)
    for (int k = 0; k < L; ++k) acc[k] += a[i + k] * b[i + k];
  float s = 0;
  for (int k = 0; k < L; ++k) s += acc[k];
  return s;
}

// out_rows[i][c] += s * y_i . B[c] for c < w; B row-major [w, R], y_i = y + i * ys.
template <int R>
void expand_fixed(const float* y, int64_t ys, const float* b, int64_t w, float s, float* const* out_rows,
                  int64_t m) {
  int64_t c0 = 0;
  if (R <= 16) {
    // Short rows: one dot product per column would end in a horizontal sum per R floats of B.
    // Instead BW columns at once, summed over k in BW lanes (B's rows read as interleaved lanes).
    constexpr int BW = R == 8 ? 16 : 8;
    for (; c0 + BW <= w; c0 += BW) {
      const float* bc = b + c0 * R;
      for (int64_t i = 0; i < m; ++i) {
        const float* yi = y + i * ys;
        float acc[BW] = {0};
        for (int k = 0; k < R; ++k)
          for (int j = 0; j < BW; ++j) acc[j] += yi[k] * bc[j * R + k];
        float* o = out_rows[i] + c0;
        for (int j = 0; j < BW; ++j) o[j] += s * acc[j];
      }
    }
  }
  for (int64_t c = c0; c < w; ++c) {  // the columns left, one dot product each
    const float* bc = b + c * R;
    for (int64_t i = 0; i < m; ++i) out_rows[i][c] += s * dot_fixed<R>(y + i * ys, bc);
  }
}

void expand(const float* y, int64_t ys, const float* b, int64_t r, int64_t w, float s, float* const* out_rows,
            int64_t m) {
  switch (r) {
    case 8: return expand_fixed<8>(y, ys, b, w, s, out_rows, m);
    case 16: return expand_fixed<16>(y, ys, b, w, s, out_rows, m);
    case 32: return expand_fixed<32>(y, ys, b, w, s, out_rows, m);
    case 64: return expand_fixed<64>(y, ys, b, w, s, out_rows, m);
    default:
      for (int64_t c = 0; c < w; ++c)
        for (int64_t i = 0; i < m; ++i) out_rows[i][c] += s * dot(y + i * ys, b + c * r, r);
  }
}

}  // namespace

// x [T, hin] and out [T, hout] fp32 with contiguous rows; pool flat fp32; rows: int64 token indices.
// groups [G, 4] int64: (first, end) into rows, A's element offset in pool, total rank (A is
//   [total_rank, hin] row-major). parts [P, 5] int64: (B offset, rank, y column, out column, width),
//   B row-major [width, rank]; part_start [G + 1]: group g's parts are part_start[g]..[g + 1];
//   scales [P] float64. chunks: group boundaries, one chunk per task (the caller balances the bytes).
// Offsets are trusted: the caller checked every matrix against the pool.
void lora_grouped(const at::Tensor& x, at::Tensor& out, const at::Tensor& pool, const at::Tensor& rows,
                  const at::Tensor& groups, const at::Tensor& parts, const at::Tensor& part_start,
                  const at::Tensor& scales, const at::Tensor& chunks) {
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* pp = pool.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* gp = groups.data_ptr<int64_t>();
  const int64_t* pa = parts.data_ptr<int64_t>();
  const int64_t* ps = part_start.data_ptr<int64_t>();
  const double* sc = scales.data_ptr<double>();
  const int64_t* ch = chunks.data_ptr<int64_t>();
  const int64_t hin = x.size(1), xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, chunks.numel() - 1, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> y;
    std::vector<float*> out_rows;
    for (int64_t g = ch[c0]; g < ch[c1]; ++g) {
      const int64_t lo = gp[4 * g], m = gp[4 * g + 1] - lo, a_off = gp[4 * g + 2], tr = gp[4 * g + 3];
      if (tr == 0) continue;  // this adapter has no such projection in this layer
      y.assign(m * tr, 0.f);
      for (int64_t k = 0; k < tr; ++k) {
        const float* a = pp + a_off + k * hin;
        for (int64_t i = 0; i < m; ++i) y[i * tr + k] = dot(xp + rp[lo + i] * xs, a, hin);
      }
      for (int64_t p = ps[g]; p < ps[g + 1]; ++p) {
        const int64_t* q = pa + 5 * p;  // b_off, rank, y_col, out_col, width
        if (q[1] == 0) continue;
        out_rows.resize(m);
        for (int64_t i = 0; i < m; ++i) out_rows[i] = op + rp[lo + i] * os + q[3];
        expand(y.data() + q[2], tr, pp + q[0], q[1], q[4], static_cast<float>(sc[p]), out_rows.data(), m);
      }
    }
  });
}

// How many threads at::parallel_for runs n items on in this build: 1 where the build lacks OpenMP.
int64_t parallel_threads(int64_t n) {
  std::vector<char> seen(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) { seen[at::get_thread_num()] = 1; });
  int64_t used = 0;
  for (char s : seen) used += s;
  return used;
}

}  // namespace tandem
