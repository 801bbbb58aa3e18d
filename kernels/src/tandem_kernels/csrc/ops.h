// Tandem's C++ CPU ops (float32): what each .cpp defines, for bindings.cpp, and the helpers they share.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace tandem {

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize without -ffast-math

// The sum of term(i) for i < n, in kLanes partial sums (dot and sum below).
template <typename Term>
inline float lanes_total(int64_t n, Term term) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += term(i + k);
  // A tree, not a chain of 16 dependent adds: the compiler turns it into a few vector shuffles.
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  float s = acc[0];
  for (; i < n; ++i) s += term(i);
  return s;
}

inline float dot(const float* a, const float* b, int64_t n) {
  return lanes_total(n, [a, b](int64_t i) { return a[i] * b[i]; });
}

inline float sum(const float* a, int64_t n) {
  return lanes_total(n, [a](int64_t i) { return a[i]; });
}

// e^x within 2 ulp of std::exp, in straight-line code a loop vectorizes (std::exp is a call per
// element: it made softmax and SiLU compute-bound). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2,
// e^r by a degree-6 polynomial, 2^n built in the exponent bits. x is clamped to [-87, 88], where
// 2^n is a normal float: e^-87 stands in for anything smaller (against a softmax sum >= 1, or as
// SiLU's 1 + e^-x, it is 0). Needs -fno-trapping-math to vectorize (the clamp's compares).
inline float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln2) by the 1.5 * 2^23 trick: the add leaves no fraction bits (floor/nearbyint are calls).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 in two parts: r exact enough
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// lora_grouped_cpu.cpp
void lora_grouped(const at::Tensor& x, at::Tensor& out, const at::Tensor& pool, const at::Tensor& rows,
                  const at::Tensor& groups, const at::Tensor& parts, const at::Tensor& part_start,
                  const at::Tensor& scales, const at::Tensor& chunks);
int64_t parallel_threads(int64_t n);

// paged_decode_attention's limits, exported to Python (bindings.cpp) so that the dispatcher sends
// other shapes to the reference rather than into the op's error.
constexpr int64_t kDecodeHeadMultiple = 8;  // head sizes in whole 8-float vectors
constexpr int64_t kDecodeMaxHeadDim = 256;
constexpr int64_t kDecodeMaxGroup = 16;  // query heads per KV head: the register arrays' size

// decode_cpu.cpp
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual);
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void store_kvcache(const at::Tensor& key, const at::Tensor& value, at::Tensor& k_cache, at::Tensor& v_cache,
                   const at::Tensor& slot_mapping);
at::Tensor silu_and_mul(const at::Tensor& gate_up);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

}  // namespace tandem
