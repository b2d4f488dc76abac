// Argument checks of multi-scale deformable attention, shared by every backend (CPU, CUDA) and by the
// CPU emulation of the CUDA kernels that the test suite builds (tests/emulation/emulated_op.cpp), so
// that all of them reject bad input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace stm_cuda_ops {

constexpr const char* kOpName = "ms_deform_attn";

// The schemas of the two ops, shared by the library (ms_deform_attn.cpp) and the test emulation.
constexpr const char* kForwardSchema =
    "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor";
constexpr const char* kBackwardSchema =
    "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
    "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
    "int im2col_step) -> (Tensor, Tensor, Tensor)";

// The validated inputs: contiguous tensors, host copies of the level geometry and the sizes.
struct Inputs {
  at::Tensor value, spatial_shapes, level_start_index, loc, attn;  // contiguous
  std::vector<int64_t> hw, start;                                  // host copies
  int64_t N = 0, S = 0, M = 0, D = 0, L = 0, P = 0, Lq = 0;

  cpu::Geometry geometry() const {
    return cpu::Geometry{N, S, M, D, L, P, Lq, hw.data(), start.data()};
  }
};

// Ranks, sizes, dtypes, devices and level geometry of the five inputs (a RuntimeError naming the
// problem otherwise). For CUDA inputs this copies spatial_shapes / level_start_index to the host.
Inputs check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                    const at::Tensor& attention_weights, int64_t im2col_step);

// grad_output of the backward against the validated inputs; returns it contiguous.
at::Tensor check_grad_output(const Inputs& in, const at::Tensor& grad_output);

}  // namespace stm_cuda_ops
