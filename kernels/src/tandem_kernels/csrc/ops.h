// Tandem's C++ CPU ops (float32): what each .cpp defines, for bindings.cpp, and the helpers they share.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace tandem {

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize without -ffast-math

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  // A tree, not a chain of 16 dependent adds: the compiler turns it into a few vector shuffles.
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  float s = acc[0];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// lora_grouped_cpu.cpp
void lora_grouped(const at::Tensor& x, at::Tensor& out, const at::Tensor& pool, const at::Tensor& rows,
                  const at::Tensor& groups, const at::Tensor& parts, const at::Tensor& part_start,
                  const at::Tensor& scales, const at::Tensor& chunks);
int64_t parallel_threads(int64_t n);

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
