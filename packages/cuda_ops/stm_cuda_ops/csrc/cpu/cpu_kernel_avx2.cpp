// CPU kernels built for AVX2 + FMA (x86-64 with GCC or Clang only); chosen at run time.
//
// Standard headers are included before the target pragma so that no inline library function is
// compiled for AVX2 here (another translation unit could otherwise pick up that copy).
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define STM_HAVE_ISA 1
#define STM_USE_AVX2_INTRINSICS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define STM_ISA_NS isa_avx2
#define STM_ISA_NAME "avx2"
#include "cpu_kernel_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace stm_cuda_ops {
namespace cpu {
#ifdef STM_HAVE_ISA
const KernelTable* kernels_avx2() { return &isa_avx2::table; }
#else
const KernelTable* kernels_avx2() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace stm_cuda_ops
