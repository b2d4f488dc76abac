// The at::Tensor side of the CUDA launchers (see ms_deform_attn_cuda_launch.h).
#include "ms_deform_attn_cuda_launch.h"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "cuda_kernels.h"

namespace stm_cuda_ops {
namespace {

int cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::kFloat32;
    case at::kDouble: return cuda::kFloat64;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default: TORCH_CHECK(false, kOpName, ": unsupported dtype ", t);
  }
  return -1;
}

cuda::Sizes cuda_sizes(const Inputs& in) {
  return cuda::Sizes{in.N, in.S, in.M, in.D, in.L, in.P, in.Lq};
}

}  // namespace

at::Tensor cuda_forward_launch(const Inputs& in, void* stream) {
  at::Tensor out = at::empty({in.N, in.Lq, in.M * in.D}, in.value.options());
  if (out.numel() == 0) return out;
  const int err = cuda::forward(
      cuda_dtype(in.value.scalar_type()), cuda_sizes(in), in.value.const_data_ptr(),
      in.spatial_shapes.const_data_ptr<int64_t>(), in.level_start_index.const_data_ptr<int64_t>(),
      in.loc.const_data_ptr(), in.attn.const_data_ptr(), out.mutable_data_ptr(), stream);
  TORCH_CHECK(err == 0, kOpName, ": CUDA forward kernel launch failed: ", cuda::error_string(err));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward_launch(const Inputs& in,
                                                                    const at::Tensor& go,
                                                                    void* stream) {
  // grad_value is summed with atomics: the float summation order varies from run to run.
  at::globalContext().alertNotDeterministic("stm_cuda_ops::ms_deform_attn_backward (CUDA)");
  const at::ScalarType dtype = in.value.scalar_type();
  const auto acc = in.value.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor grad_value = at::zeros(in.value.sizes(), acc);
  at::Tensor grad_loc = at::zeros(in.loc.sizes(), acc);
  at::Tensor grad_attn = at::zeros(in.attn.sizes(), acc);
  if (in.N * in.Lq * in.M * in.D > 0 && grad_loc.numel() > 0) {
    const int err = cuda::backward(
        cuda_dtype(dtype), cuda_sizes(in), in.value.const_data_ptr(),
        in.spatial_shapes.const_data_ptr<int64_t>(),
        in.level_start_index.const_data_ptr<int64_t>(), in.loc.const_data_ptr(),
        in.attn.const_data_ptr(), go.const_data_ptr(), grad_value.mutable_data_ptr(),
        grad_loc.mutable_data_ptr(), grad_attn.mutable_data_ptr(), stream);
    TORCH_CHECK(err == 0, kOpName, ": CUDA backward kernel launch failed: ",
                cuda::error_string(err));
  }
  if (grad_value.scalar_type() != dtype) {
    return {grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)};
  }
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace stm_cuda_ops
