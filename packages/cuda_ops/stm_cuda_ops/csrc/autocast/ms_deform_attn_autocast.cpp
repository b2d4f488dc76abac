// Autocast for multi-scale deformable attention: under torch.autocast the op runs in float32
// (float16/bfloat16 inputs are cast up, float64 is left alone, as torch.autocast does for its float32
// ops), with autocast disabled inside, then redispatches to the CPU or CUDA kernels. Registered for the
// AutocastCPU and AutocastCUDA keys of the ops of ms_deform_attn.cpp; this is what the original
// module's `custom_fwd(cast_inputs=torch.float32)` did.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

namespace stm_cuda_ops {
namespace {

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor autocast_to_f32(const at::Tensor& t) {
  return (t.defined() && is_reduced_float(t.scalar_type())) ? t.to(at::kFloat) : t;
}

at::Tensor ms_deform_attn_forward_autocast(const at::Tensor& value,
                                           const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights,
                                           int64_t im2col_step) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stm_cuda_ops::ms_deform_attn_forward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(autocast_to_f32(value), spatial_shapes, level_start_index,
                 autocast_to_f32(sampling_locations), autocast_to_f32(attention_weights),
                 im2col_step);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_autocast(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stm_cuda_ops::ms_deform_attn_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, int64_t)>();
  return op.call(autocast_to_f32(value), spatial_shapes, level_start_index,
                 autocast_to_f32(sampling_locations), autocast_to_f32(attention_weights),
                 autocast_to_f32(grad_output), im2col_step);
}

}  // namespace

TORCH_LIBRARY_IMPL(stm_cuda_ops, AutocastCPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_autocast);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_autocast);
}

TORCH_LIBRARY_IMPL(stm_cuda_ops, AutocastCUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_autocast);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_autocast);
}

}  // namespace stm_cuda_ops
