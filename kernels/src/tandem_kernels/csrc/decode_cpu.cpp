// The small per-layer ops of a CPU forward pass in float32: RMSNorm (with the residual add),
// rotary embedding, the KV cache write, SiLU-and-mul, and paged decode attention.
//
// Why C++: a batch-1 decode step of SmolLM2 is about 25 ms of weight reads in the projections and,
// as torch ops, about 1,200 small ops around them (norms, rotary's slices and concatenations, the
// cache write's checks, the KV gather before attention), each a few to tens of microseconds of
// dispatch and thread wake-ups for a few hundred floats of work. Here each is one call and a plain
// loop. Results are the references' arithmetic up to the order of float32 sums and exp's last bit
// (exp_fast, within 2 ulp): not bit-identical.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops.h"

namespace tandem {
namespace {

// Rows (or items) below which a loop stays on the calling thread: waking the pool costs more.
constexpr int64_t kSerialFloats = 1 << 15;

inline int64_t grain_for(int64_t floats_per_item) {
  return std::max<int64_t>(1, kSerialFloats / std::max<int64_t>(1, floats_per_item));
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a CPU float32 tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, "'s last dimension must be contiguous");
}

void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
}

// An index tensor the op reads on the host: CPU, contiguous, of this type and rank.
void check_index(const at::Tensor& t, at::ScalarType type, int64_t dim, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == dim && t.is_contiguous(), what);
}

struct Pages {
  const float* k;
  const float* v;
  int64_t block_size, block_stride, pos_stride;
};

// fn(rows, p0, n) for each block of the first ctx positions of one KV head: n rows of D floats, one
// per position from p0, at head_off in each position of the sequence's pages (`table`) and
// pos_stride apart. The next page is asked for before this one is read: pages are scattered, so
// the hardware prefetcher, which follows addresses within a page, cannot see the next one coming.
template <typename Fn>
inline void for_each_block(const float* pages, const Pages& pg, const int32_t* table, int64_t ctx,
                           int64_t head_off, int64_t d, Fn&& fn) {
  for (int64_t p0 = 0, b = 0; p0 < ctx; p0 += pg.block_size, ++b) {
    const int64_t n = std::min(pg.block_size, ctx - p0);
    const int64_t ahead = std::min(pg.block_size, ctx - p0 - n);
    const float* next = pages + (ahead > 0 ? table[b + 1] : 0) * pg.block_stride + head_off;
    for (int64_t i = 0; i < ahead; ++i)
      for (int64_t c = 0; c < d; c += 16) __builtin_prefetch(next + i * pg.pos_stride + c);
    fn(pages + table[b] * pg.block_stride + head_off, p0, n);
  }
}

// 8 floats as one value: an AVX2 register (two NEON ones); GCC and Clang lower its arithmetic to
// the target's vector instructions, so the loops below are vectorized by construction.
typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

#if defined(__clang__) || __GNUC__ >= 12
#define TANDEM_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t i8 __attribute__((vector_size(32)));
#define TANDEM_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif

// The lane sums of s[0..7], as one vector: a transposed reduction (7 adds for 8 sums, where one
// sum at a time costs 3 adds and 3 shuffles, or a trip through memory).
inline f8 lane_sums(const f8* s) {
  f8 t[4];
  for (int r = 0; r < 4; ++r)  // t[r] = pair sums of s[2r] and s[2r + 1], interleaved
    t[r] = TANDEM_SHUFFLE(s[2 * r], s[2 * r + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           TANDEM_SHUFFLE(s[2 * r], s[2 * r + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  // u0 = [s0, s1, s2, s3 over lanes 0-3 | the same over lanes 4-7], u1 the same for s4-s7
  const f8 u0 = TANDEM_SHUFFLE(t[0], t[1], 0, 1, 8, 9, 4, 5, 12, 13) +
                TANDEM_SHUFFLE(t[0], t[1], 2, 3, 10, 11, 6, 7, 14, 15);
  const f8 u1 = TANDEM_SHUFFLE(t[2], t[3], 0, 1, 8, 9, 4, 5, 12, 13) +
                TANDEM_SHUFFLE(t[2], t[3], 2, 3, 10, 11, 6, 7, 14, 15);
  return TANDEM_SHUFFLE(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) + TANDEM_SHUFFLE(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

inline float max_lane(f8 v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = std::max(m, v[i]);
  return m;
}

// One (sequence, KV head): the `group` query heads that share it, over its first ctx positions.
// K is read once for all the group's scores, then V once for all its outputs, a page at a time:
// each head's query (and, for V, its sum) stays in registers while the page's rows, in L1 after
// the first head, stream past. D > 0 fixes the head size at compile time; any size is a multiple
// of 8.
template <int64_t D>
void attend(const Pages& pg, const int32_t* table, int64_t ctx, int64_t head_off, const float* q, int64_t qh,
            int64_t group, int64_t d_rt, float scale, float* scores, int64_t stride, float* out) {
  const int64_t d = D > 0 ? D : d_rt, nv = d / 8;
  constexpr int64_t kVecs = (D > 0 ? D : kDecodeMaxHeadDim) / 8;
  const f8 neg_inf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  f8 mx[kDecodeMaxGroup];
  std::fill(mx, mx + group, neg_inf);
  for_each_block(pg.k, pg, table, ctx, head_off, d, [&](const float* rows, int64_t p0, int64_t n) {
    for (int64_t j = 0; j < group; ++j) {
      f8 qv[kVecs];
      for (int64_t c = 0; c < nv; ++c) qv[c] = load8(q + j * qh + 8 * c);
      float* sc = scores + j * stride + p0;
      for (int64_t i = 0; i < n; i += 8) {
        f8 part[8];
        for (int64_t r = 0; r < 8; ++r) {  // past the block's end, its last row again (not stored)
          const float* k = rows + std::min(i + r, n - 1) * pg.pos_stride;
          f8 a = qv[0] * load8(k);
          for (int64_t c = 1; c < nv; ++c) a += qv[c] * load8(k + 8 * c);
          part[r] = a;
        }
        const f8 x = lane_sums(part) * scale;
        mx[j] = mx[j] > x ? mx[j] : x;
        std::memcpy(sc + i, &x, sizeof(float) * std::min<int64_t>(8, n - i));
      }
    }
  });
  float total[kDecodeMaxGroup];
  for (int64_t j = 0; j < group; ++j) {
    float* sc = scores + j * stride;
    const float m = max_lane(mx[j]);
    for (int64_t p = 0; p < ctx; ++p) sc[p] = exp_fast(sc[p] - m);
    total[j] = sum(sc, ctx);
  }
  f8 sums[kDecodeMaxGroup][kVecs];  // only the group's rows are used: only they are zeroed
  for (int64_t j = 0; j < group; ++j) std::fill(sums[j], sums[j] + nv, f8{});
  for_each_block(pg.v, pg, table, ctx, head_off, d, [&](const float* rows, int64_t p0, int64_t n) {
    for (int64_t j = 0; j < group; ++j) {
      f8 acc[kVecs];
      for (int64_t c = 0; c < nv; ++c) acc[c] = sums[j][c];
      const float* w = scores + j * stride + p0;
      for (int64_t i = 0; i < n; ++i) {
        const float* v = rows + i * pg.pos_stride;
        for (int64_t c = 0; c < nv; ++c) acc[c] += w[i] * load8(v + 8 * c);
      }
      for (int64_t c = 0; c < nv; ++c) sums[j][c] = acc[c];
    }
  });
  for (int64_t j = 0; j < group; ++j) {
    const float inv = 1.0f / total[j];
    for (int64_t c = 0; c < nv; ++c) {
      const f8 o = sums[j][c] * inv;
      std::memcpy(out + j * d + 8 * c, &o, sizeof o);
    }
  }
}

}  // namespace

// (norm(h), h) where h = x + residual (a new tensor), or h = x without one: Llama's RMSNorm,
// h * rsqrt(mean(h^2) + eps) * weight, row by row.
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [T, N] and weight [N]");
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor h = x;
  if (residual.has_value()) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape");
    h = at::empty_like(x, at::MemoryFormat::Contiguous);
  }
  auto out = at::empty({rows, n}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const int64_t xs = x.stride(0), rs = residual.has_value() ? residual->stride(0) : 0;
  float* hp = h.data_ptr<float>();
  const int64_t hs = h.stride(0);
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_for(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* hr = hp + r * hs;
      if (rp) {
        const float* xr = xp + r * xs;
        const float* rr = rp + r * rs;
        for (int64_t i = 0; i < n; ++i) hr[i] = xr[i] + rr[i];
      }
      const float inv = 1.0f / std::sqrt(dot(hr, hr, n) / static_cast<float>(n) + feps);
      float* o = op + r * n;
      for (int64_t i = 0; i < n; ++i) o[i] = hr[i] * inv * w[i];
    }
  });
  return {out, h};
}

// One token's heads rotated: out = x * cos + rot(x) * sin, rot(x) = [-x2, x1]. GCC fuses a * b + c
// into one multiply-add by default (-ffp-contract=fast), rounding once where the reference rounds
// twice; off for this function (a lambda would not inherit it), so rotary is the reference bit for bit.
__attribute__((optimize("fp-contract=off"), noinline)) void rotate_token(const float* x, int64_t head_stride,
                                                                        int64_t heads, int64_t d, const float* c,
                                                                        const float* s, float* out) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xr = x + h * head_stride;
    float* o = out + h * d;
    for (int64_t j = 0; j < half; ++j) o[j] = xr[j] * c[j] + -xr[j + half] * s[j];
    for (int64_t j = half; j < d; ++j) o[j] = xr[j] * c[j] + xr[j - half] * s[j];
  }
}

// x [T, heads, D] rotated by cos, sin [T, 1, D] (rotate-half layout), into a new contiguous
// tensor. x may be a strided view (a slice of qkv).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  TORCH_CHECK(x.dim() == 3 && cos.dim() == 3 && cos.sizes() == sin.sizes(), "x [T, H, D], cos and sin [T, 1, D]");
  const int64_t t = x.size(0), heads = x.size(1), d = x.size(2);
  TORCH_CHECK(cos.size(0) == t && cos.size(1) == 1 && cos.size(2) == d && d % 2 == 0,
              "cos and sin must be [T, 1, D], D even");
  auto out = at::empty({t, heads, d}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xt = x.stride(0), xh = x.stride(1), ct = cos.stride(0), st = sin.stride(0);
  at::parallel_for(0, t, grain_for(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      rotate_token(xp + i * xt, xh, heads, d, cp + i * ct, sp + i * st, op + i * heads * d);
  });
  return out;
}

// Each token's key and value [T, kv_heads, D] into its cache slot (slot_mapping [T] int64, -1 to
// skip) of k_cache, v_cache [blocks, block_size, kv_heads, D]. A slot out of range is an error,
// raised before anything is written.
void store_kvcache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  check_f32(key, "key");
  check_f32(value, "value");
  check_caches(k_cache, v_cache);
  check_index(slot_mapping, at::kLong, 1, "slot_mapping must be a contiguous CPU int64 vector");
  const int64_t t = key.size(0), kvh = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(key.dim() == 3 && key.size(1) == kvh && key.size(2) == d && value.sizes() == key.sizes(),
              "key and value must be [T, kv_heads, head_dim] as the cache");
  TORCH_CHECK(slot_mapping.size(0) == t, "one slot per token");
  const int64_t slots = k_cache.size(0) * k_cache.size(1), row = kvh * d;
  const int64_t* sm = slot_mapping.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i)
    TORCH_CHECK(sm[i] >= -1 && sm[i] < slots, "cache slot ", sm[i], " out of range [0, ", slots, ")");
  const float* kp = key.data_ptr<float>();
  const float* vp = value.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t kt = key.stride(0), kh = key.stride(1), vt = value.stride(0), vh = value.stride(1);
  for (int64_t i = 0; i < t; ++i) {
    if (sm[i] < 0) continue;
    for (int64_t h = 0; h < kvh; ++h) {
      std::memcpy(kc + sm[i] * row + h * d, kp + i * kt + h * kh, d * sizeof(float));
      std::memcpy(vc + sm[i] * row + h * d, vp + i * vt + h * vh, d * sizeof(float));
    }
  }
}

// SiLU(gate) * up for gate_up = [gate | up] [T, 2I]: [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_f32(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [T, 2I]");
  const int64_t t = gate_up.size(0), inter = gate_up.size(1) / 2, gs = gate_up.stride(0);
  auto out = at::empty({t, inter}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t, grain_for(inter), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* g = gp + i * gs;
      const float* u = g + inter;
      float* o = op + i * inter;
      for (int64_t j = 0; j < inter; ++j) o[j] = g[j] / (1.0f + exp_fast(-g[j])) * u[j];
    }
  });
  return out;
}

// One query token per sequence (q [S, heads, D]) attending to its first context_lens[s] cached
// positions, found through block_tables [S, max_blocks] int32 in k_cache, v_cache [blocks,
// block_size, kv_heads, D]: softmax(q k^T * scale) v, [S, heads, D]. Read in place from the pages
// (no gather), each (sequence, KV head) once for all the query heads that share it (GQA).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_f32(q, "q");
  check_caches(k_cache, v_cache);
  check_index(block_tables, at::kInt, 2, "block_tables must be a contiguous CPU int32 [S, max_blocks]");
  check_index(context_lens, at::kInt, 1, "context_lens must be a contiguous CPU int32 [S]");
  const int64_t seqs = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(q.dim() == 3 && k_cache.size(3) == d && heads % kvh == 0, "q [S, heads, D] against the cache");
  TORCH_CHECK(block_tables.size(0) == seqs && context_lens.size(0) == seqs, "one table row and length per sequence");
  const int64_t width = block_tables.size(1), group = heads / kvh;
  TORCH_CHECK(group <= kDecodeMaxGroup, "at most ", kDecodeMaxGroup, " query heads per KV head");
  TORCH_CHECK(d % kDecodeHeadMultiple == 0 && d <= kDecodeMaxHeadDim, "head size must be a multiple of ",
              kDecodeHeadMultiple, ", at most ", kDecodeMaxHeadDim);
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* cl = context_lens.data_ptr<int32_t>();
  int64_t longest = 0, total = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    TORCH_CHECK(cl[s] >= 1 && cl[s] <= width * bs, "context length ", cl[s], " of sequence ", s,
                " outside [1, ", width * bs, "]");
    for (int64_t b = 0; b < (cl[s] + bs - 1) / bs; ++b)
      TORCH_CHECK(bt[s * width + b] >= 0 && bt[s * width + b] < num_blocks, "block ", bt[s * width + b],
                  " of sequence ", s, " out of range");
    longest = std::max<int64_t>(longest, cl[s]);
    total += cl[s];
  }
  auto out = at::empty({seqs, heads, d}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs = q.stride(0), qh = q.stride(1);
  const int64_t pos_stride = kvh * d, block_stride = bs * pos_stride;
  const float fscale = static_cast<float>(scale);
  const int64_t items = seqs * kvh;
  // One run of consecutive items per thread, cut where the work (context lengths) is even, not
  // the count: split by count, a batch of mixed lengths left one thread waiting on the other. Even
  // batch 1 gains from the second thread: its pages are mostly not in cache, and two threads wait
  // on twice the reads. Small batches stay on this thread (waking the pool costs more).
  const int64_t work = total * kvh * 2 * group * d;  // floats read or made
  const int64_t runs = work < kSerialFloats ? 1 : std::min<int64_t>(items, at::get_num_threads());
  std::vector<int64_t> first(runs + 1, items);
  first[0] = 0;
  for (int64_t r = 1, item = 0, done = 0; r < runs; ++r) {
    const int64_t target = total * kvh * r / runs;  // positions, over all the KV heads
    while (item < items && done + cl[item / kvh] / 2 < target) done += cl[item++ / kvh];
    first[r] = item;
  }
  const Pages pages{kc, vc, bs, block_stride, pos_stride};
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * longest);
    for (int64_t item = first[begin]; item < first[end]; ++item) {
      const int64_t s = item / kvh, g = item % kvh;
      const float* qg = qp + s * qs + g * group * qh;
      float* og = op + (s * heads + g * group) * d;
      const int32_t* table = bt + s * width;
      if (d == 64)
        attend<64>(pages, table, cl[s], g * d, qg, qh, group, d, fscale, scores.data(), longest, og);
      else if (d == 128)
        attend<128>(pages, table, cl[s], g * d, qg, qh, group, d, fscale, scores.data(), longest, og);
      else
        attend<0>(pages, table, cl[s], g * d, qg, qh, group, d, fscale, scores.data(), longest, og);
    }
  });
  return out;
}

}  // namespace tandem
