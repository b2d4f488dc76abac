// Argument checks of multi-scale deformable attention (see ms_deform_attn_validate.h).
#include "ms_deform_attn_validate.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace stm_cuda_ops {
namespace {

void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.defined(), kOpName, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.dim() == dim, kOpName, ": ", name, " must be ", dim, "-D ", layout, ", got ",
              t.dim(), "-D tensor of shape ", t.sizes());
}

void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                const char* what) {
  TORCH_CHECK(t.size(dim) == expected, kOpName, ": ", name, ".shape[", dim, "] = ", t.size(dim),
              " does not match ", what, " = ", expected, " (", name, " shape ", t.sizes(), ")");
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

Inputs check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                    const at::Tensor& attention_weights, int64_t im2col_step) {
  check_dim(value, "value", 4, "(N, S, M, D)");
  check_dim(spatial_shapes, "spatial_shapes", 2, "(L, 2)");
  check_dim(level_start_index, "level_start_index", 1, "(L,)");
  check_dim(sampling_locations, "sampling_locations", 6, "(N, Lq, M, L, P, 2)");
  check_dim(attention_weights, "attention_weights", 5, "(N, Lq, M, L, P)");

  // Devices.
  const auto device = value.device();
  const std::pair<const at::Tensor*, const char*> others[] = {
      {&spatial_shapes, "spatial_shapes"},
      {&level_start_index, "level_start_index"},
      {&sampling_locations, "sampling_locations"},
      {&attention_weights, "attention_weights"}};
  for (const auto& o : others) {
    TORCH_CHECK(o.first->device() == device, kOpName,
                ": all tensors must be on the same device, but value is on ", device, " and ",
                o.second, " is on ", o.first->device());
  }

  // Dtypes.
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, kOpName,
              ": spatial_shapes must be an int64 (torch.long) tensor, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, kOpName,
              ": level_start_index must be an int64 (torch.long) tensor, got ",
              level_start_index.scalar_type());
  TORCH_CHECK(is_supported_float(value.scalar_type()), kOpName,
              ": value must be float32, float64, float16 or bfloat16, got ", value.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type(), kOpName,
              ": sampling_locations dtype (", sampling_locations.scalar_type(),
              ") must match value dtype (", value.scalar_type(), ")");
  TORCH_CHECK(attention_weights.scalar_type() == value.scalar_type(), kOpName,
              ": attention_weights dtype (", attention_weights.scalar_type(),
              ") must match value dtype (", value.scalar_type(), ")");

  // Sizes.
  Inputs in;
  in.N = value.size(0);
  in.S = value.size(1);
  in.M = value.size(2);
  in.D = value.size(3);
  in.L = spatial_shapes.size(0);
  in.Lq = sampling_locations.size(1);
  in.P = sampling_locations.size(4);
  TORCH_CHECK(spatial_shapes.size(1) == 2, kOpName,
              ": spatial_shapes must have shape (L, 2) with rows (H, W), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(in.L > 0, kOpName, ": spatial_shapes has no levels (L = 0)");
  TORCH_CHECK(in.S > 0, kOpName, ": value has S = 0 spatial positions (shape ", value.sizes(),
              "); S must equal the sum of H*W over levels");
  check_size(level_start_index, "level_start_index", 0, in.L, "the number of levels L");
  check_size(sampling_locations, "sampling_locations", 0, in.N, "the batch size N of value");
  check_size(sampling_locations, "sampling_locations", 2, in.M, "the number of heads M of value");
  check_size(sampling_locations, "sampling_locations", 3, in.L,
             "the number of levels L of spatial_shapes");
  TORCH_CHECK(sampling_locations.size(5) == 2, kOpName,
              ": sampling_locations must end in a (x, y) axis of size 2, got shape ",
              sampling_locations.sizes());
  check_size(attention_weights, "attention_weights", 0, in.N, "the batch size N of value");
  check_size(attention_weights, "attention_weights", 1, in.Lq,
             "the number of queries Lq of sampling_locations");
  check_size(attention_weights, "attention_weights", 2, in.M, "the number of heads M of value");
  check_size(attention_weights, "attention_weights", 3, in.L,
             "the number of levels L of spatial_shapes");
  check_size(attention_weights, "attention_weights", 4, in.P,
             "the number of points P of sampling_locations");
  TORCH_CHECK(im2col_step > 0, kOpName, ": im2col_step must be positive, got ", im2col_step);

  // Level geometry (host copies; a small device-to-host copy for CUDA inputs).
  at::Tensor shapes_host = spatial_shapes.device().is_cpu() ? spatial_shapes.contiguous()
                                                            : spatial_shapes.cpu().contiguous();
  at::Tensor start_host = level_start_index.device().is_cpu()
                              ? level_start_index.contiguous()
                              : level_start_index.cpu().contiguous();
  in.hw.assign(shapes_host.data_ptr<int64_t>(), shapes_host.data_ptr<int64_t>() + 2 * in.L);
  in.start.assign(start_host.data_ptr<int64_t>(), start_host.data_ptr<int64_t>() + in.L);
  int64_t total = 0;
  for (int64_t l = 0; l < in.L; ++l) {
    const int64_t H = in.hw[2 * l], W = in.hw[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, kOpName, ": spatial_shapes[", l, "] = (", H, ", ", W,
                ") must be positive (H, W)");
    TORCH_CHECK(H < (int64_t(1) << 30) && W < (int64_t(1) << 30), kOpName, ": spatial_shapes[",
                l, "] = (", H, ", ", W, ") is too large (each side must be below 2^30)");
    TORCH_CHECK(H <= in.S && W <= in.S && H * W <= in.S - total, kOpName,
                ": spatial_shapes do not fit in value: levels 0..", l, " need more than S = ",
                in.S, " rows (spatial_shapes[", l, "] = (", H, ", ", W, "))");
    TORCH_CHECK(in.start[l] == total, kOpName, ": level_start_index[", l, "] = ", in.start[l],
                ", expected ", total, " (the running sum of H*W over the previous levels)");
    total += H * W;
  }
  TORCH_CHECK(total == in.S, kOpName, ": the spatial_shapes sum of H*W over levels is ", total,
              " but value has S = ", in.S, " rows (value shape ", value.sizes(), ")");

  in.value = value.contiguous();
  in.spatial_shapes = spatial_shapes.contiguous();
  in.level_start_index = level_start_index.contiguous();
  in.loc = sampling_locations.contiguous();
  in.attn = attention_weights.contiguous();
  return in;
}

at::Tensor check_grad_output(const Inputs& in, const at::Tensor& grad_output) {
  check_dim(grad_output, "grad_output", 3, "(N, Lq, M*D)");
  TORCH_CHECK(grad_output.device() == in.value.device(), kOpName,
              ": grad_output is on ", grad_output.device(), " but value is on ",
              in.value.device());
  TORCH_CHECK(grad_output.scalar_type() == in.value.scalar_type(), kOpName,
              ": grad_output dtype (", grad_output.scalar_type(), ") must match value dtype (",
              in.value.scalar_type(), ")");
  TORCH_CHECK(grad_output.size(0) == in.N && grad_output.size(1) == in.Lq &&
                  grad_output.size(2) == in.M * in.D,
              kOpName, ": grad_output must have shape (N, Lq, M*D) = (", in.N, ", ", in.Lq, ", ",
              in.M * in.D, "), got ", grad_output.sizes());
  return grad_output.contiguous();
}

}  // namespace stm_cuda_ops
