// The CUDA backend of multi-scale deformable attention: the dispatcher's CUDA kernels (validation,
// device guard, current stream) around the launchers, registered for the ops of ms_deform_attn.cpp.
// Compiled only into builds with the CUDA kernels (setup.py defines STM_WITH_CUDA for them).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/ms_deform_attn_cuda_launch.h"
#include "ms_deform_attn_validate.h"

namespace stm_cuda_ops {
namespace {

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const c10::cuda::CUDAGuard guard(in.value.device());
  return cuda_forward_launch(
      in, c10::cuda::getCurrentCUDAStream(in.value.device().index()).stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const at::Tensor go = check_grad_output(in, grad_output);
  const c10::cuda::CUDAGuard guard(in.value.device());
  return cuda_backward_launch(
      in, go, c10::cuda::getCurrentCUDAStream(in.value.device().index()).stream());
}

}  // namespace

TORCH_LIBRARY_IMPL(stm_cuda_ops, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace stm_cuda_ops
