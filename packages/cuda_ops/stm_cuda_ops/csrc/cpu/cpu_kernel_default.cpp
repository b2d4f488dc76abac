// CPU kernels built for the baseline instruction set of the compiler's target.
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

#define STM_ISA_NS isa_default
#define STM_ISA_NAME "default"
#include "cpu_kernel_impl.h"

namespace stm_cuda_ops {
namespace cpu {
const KernelTable* kernels_default() { return &isa_default::table; }
}  // namespace cpu
}  // namespace stm_cuda_ops
