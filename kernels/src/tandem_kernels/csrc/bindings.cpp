// The Python module of Tandem's C++ CPU ops (cpu_extension.py builds it).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace tandem;
  // The GIL is let go during each call, as torch's own ops do: a long step (a large batch's
  // attention, a LoRA step) must not stall the server's threads.
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("lora_grouped", &lora_grouped, "grouped LoRA shrink + expand of one fused projection, in place", nogil);
  m.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses for n items (a build check)", nogil);
  m.def("rms_norm", &rms_norm, "(RMSNorm of h, h) for h = x + residual, or x", nogil);
  m.def("rotary", &rotary, "rotate-half rotary embedding into a new tensor", nogil);
  m.def("store_kvcache", &store_kvcache, "keys and values into their cache slots, in place", nogil);
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up", nogil);
  m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its paged KV", nogil);
  m.attr("DECODE_HEAD_MULTIPLE") = kDecodeHeadMultiple;
  m.attr("DECODE_MAX_HEAD_DIM") = kDecodeMaxHeadDim;
  m.attr("DECODE_MAX_GROUP") = kDecodeMaxGroup;
}
