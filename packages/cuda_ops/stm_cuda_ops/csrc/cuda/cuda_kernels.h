// Plain C++ launcher interface of the CUDA kernels of multi-scale deformable attention.
//
// Deliberately free of torch and CUDA headers: ms_deform_attn_cuda.cu includes only this file and
// the CUDA toolkit headers (it compiles several times faster without the ATen headers), and the
// torch glue (ms_deform_attn_cuda_launch.cpp, ms_deform_attn_cuda_glue.cpp) does all the at::Tensor
// work: validation, allocation, streams.
// All pointers are device pointers to contiguous memory; the launchers return 0 on success or
// a cudaError_t value (see error_string).
#pragma once

#include <cstdint>

namespace stm_cuda_ops {
namespace cuda {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct Sizes {
  int64_t N, S, M, D, L, P, Lq;
};

// out (N, Lq, M*D) of dtype; every element is written.
int forward(int dtype, const Sizes& s, const void* value, const int64_t* spatial_shapes,
            const int64_t* level_start_index, const void* loc, const void* attn, void* out,
            void* stream);

// Accumulates into zero-initialised buffers of the accumulation type (float64 for kFloat64,
// float32 otherwise): grad_value (N, S, M, D), grad_loc (N, Lq, M, L, P, 2),
// grad_attn (N, Lq, M, L, P). value, loc, attn and grad_out have type dtype.
int backward(int dtype, const Sizes& s, const void* value, const int64_t* spatial_shapes,
             const int64_t* level_start_index, const void* loc, const void* attn,
             const void* grad_out, void* grad_value, void* grad_loc, void* grad_attn,
             void* stream);

const char* error_string(int code);
int runtime_version_compiled();  // CUDART_VERSION the kernels were compiled against
const char* compiled_archs();    // e.g. "800,900" (from nvcc's __CUDA_ARCH_LIST__)

}  // namespace cuda
}  // namespace stm_cuda_ops
