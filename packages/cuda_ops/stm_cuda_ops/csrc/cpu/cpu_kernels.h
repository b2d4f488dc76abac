// Plain C++ interface of the CPU kernels of multi-scale deformable attention.
//
// No torch headers here on purpose: the kernel translation units include only this header and the
// standard library, so they compile in a second, and each one can be built for a different
// instruction set (see cpu_kernel_*.cpp). The torch glue (ms_deform_attn_cpu.cpp) owns threading,
// allocation and validation and calls these functions on disjoint pieces of work.
#pragma once

#include <cstdint>

namespace stm_cuda_ops {
namespace cpu {

// Sizes of one call. value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2),
// attention_weights (N, Lq, M, L, P), output (N, Lq, M*D); all contiguous.
struct Geometry {
  int64_t N, S, M, D, L, P, Lq;
  const int64_t* hw;     // (L, 2): H_l, W_l (validated: positive, sum of H_l*W_l == S)
  const int64_t* start;  // (L,): first row of level l along S (validated)
};

// Forward over output rows [row_begin, row_end), row = n * Lq + q (all heads of each row).
template <typename T>
using ForwardFn = void (*)(const Geometry& g, const T* value, const T* loc, const T* attn, T* out,
                           int64_t row_begin, int64_t row_end);

// Backward of batch item n, queries [q_begin, q_end), all heads.
// grad_value: (N, S, M, D) buffer that this call accumulates into (only the slice of item n is
// touched, so calls for different n never write the same element). grad_loc / grad_attn are
// written (not accumulated) for every (n, q, m, l, p) in range, zeros for out-of-range samples.
template <typename T>
using BackwardFn = void (*)(const Geometry& g, const T* value, const T* loc, const T* attn,
                            const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t n,
                            int64_t q_begin, int64_t q_end);

struct KernelTable {
  const char* isa;
  ForwardFn<float> forward_f32;
  ForwardFn<double> forward_f64;
  BackwardFn<float> backward_f32;
  BackwardFn<double> backward_f64;
};

// Each returns nullptr when that instruction set was not compiled in (non-x86 or compiler lacking
// the target attribute). kernels_default() is always available.
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace cpu
}  // namespace stm_cuda_ops
