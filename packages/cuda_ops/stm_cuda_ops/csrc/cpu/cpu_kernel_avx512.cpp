// CPU kernels built for AVX-512 (F, VL, BW, DQ) + FMA (x86-64 with GCC or Clang only); chosen at
// run time. GCC is asked for 512-bit vectors (its default tuning would use 256-bit ones).
//
// Standard headers are included before the target pragma so that no inline library function is
// compiled for AVX-512 here (another translation unit could otherwise pick up that copy).
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define STM_HAVE_ISA 1
#define STM_USE_AVX2_INTRINSICS 1
#define STM_USE_AVX512_INTRINSICS 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#endif
#define STM_ISA_NS isa_avx512
#define STM_ISA_NAME "avx512"
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
const KernelTable* kernels_avx512() { return &isa_avx512::table; }
#else
const KernelTable* kernels_avx512() { return nullptr; }
#endif
}  // namespace cpu
}  // namespace stm_cuda_ops
