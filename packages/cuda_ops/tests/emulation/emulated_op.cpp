// Torch glue of the emulated CUDA kernels: the ops stm_cuda_ops_emulated::ms_deform_attn_forward /
// ms_deform_attn_backward take CPU tensors and run them through the same validation and launch
// code as the real CUDA ops (csrc/ms_deform_attn_validate.cpp, csrc/cuda/ms_deform_attn_cuda_launch.cpp,
// compiled into this library too), with the kernels of csrc/cuda/ms_deform_attn_cuda.cu executed by
// the emulation (emulated_kernels.cpp). Built and loaded by the tests (conftest.py).
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cuda/ms_deform_attn_cuda_launch.h"
#include "ms_deform_attn_validate.h"

// The emulation's controls, defined in the kernel translation unit (emulated_kernels.cpp); declared
// here rather than in a shared header to keep the torch headers and the CUDA stand-ins apart.
namespace stm_emu {
void configure(uint64_t seed, int64_t max_blocks);
void reset_stats();
std::vector<int64_t> stats_vector();
std::string run_selftest(const std::string& name);
}  // namespace stm_emu

// The emulation runs one grid at a time on the calling thread (its scheduler state is global).
namespace {
std::mutex g_emulation_mutex;
}

namespace stm_cuda_ops {
namespace {

at::Tensor emulated_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index,
                            const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const std::lock_guard<std::mutex> lock(g_emulation_mutex);
  return cuda_forward_launch(in, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const at::Tensor go = check_grad_output(in, grad_output);
  const std::lock_guard<std::mutex> lock(g_emulation_mutex);
  return cuda_backward_launch(in, go, nullptr);
}

// seed 0: blocks in order and lanes ascending; else a seeded block permutation and lane order.
// max_blocks caps the grid (the kernels' grid-stride loops cover the rest).
void configure_op(int64_t seed, int64_t max_blocks) {
  TORCH_CHECK(seed >= 0 && max_blocks >= 1, "configure: seed >= 0 and max_blocks >= 1");
  const std::lock_guard<std::mutex> lock(g_emulation_mutex);
  stm_emu::configure(static_cast<uint64_t>(seed), max_blocks);
}

// [launches, blocks, threads, warp collectives, block barriers, atomics, last grid.x, block.x]
std::vector<int64_t> stats_op(bool reset) {
  const std::lock_guard<std::mutex> lock(g_emulation_mutex);
  std::vector<int64_t> s = stm_emu::stats_vector();
  if (reset) stm_emu::reset_stats();
  return s;
}

std::string selftest_op(c10::string_view name) {
  const std::lock_guard<std::mutex> lock(g_emulation_mutex);
  return stm_emu::run_selftest(std::string(name.data(), name.size()));
}

}  // namespace
}  // namespace stm_cuda_ops

TORCH_LIBRARY(stm_cuda_ops_emulated, m) {
  m.def(stm_cuda_ops::kForwardSchema);
  m.def(stm_cuda_ops::kBackwardSchema);
  m.def("configure(int seed, int max_blocks) -> ()", &stm_cuda_ops::configure_op);
  m.def("stats(bool reset=False) -> int[]", &stm_cuda_ops::stats_op);
  m.def("selftest(str name) -> str", &stm_cuda_ops::selftest_op);
}

TORCH_LIBRARY_IMPL(stm_cuda_ops_emulated, CPU, m) {
  m.impl("ms_deform_attn_forward", &stm_cuda_ops::emulated_forward);
  m.impl("ms_deform_attn_backward", &stm_cuda_ops::emulated_backward);
}
