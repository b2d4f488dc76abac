// The CPU backend's instruction-set dispatch, as seen by the operator library (ms_deform_attn.cpp):
// which kernel set (cpu_kernel_{default,avx2,avx512}.cpp) runs, for `_build_flags` and `_cpu_isa`.
// The CPU kernels themselves are registered with the dispatcher by ms_deform_attn_cpu.cpp.
#pragma once

#include <c10/util/string_view.h>

#include <string>

namespace stm_cuda_ops {
namespace cpu {

// Name of the kernel set in use ("default", "avx2" or "avx512"); chosen on first use.
const char* active_isa();

// The kernel sets this machine and build can run, comma-separated ("default,avx2,avx512").
std::string available_isas();

// Debug/testing hook behind the `_cpu_isa` op: "avx2" etc. selects a kernel set (an error if it is
// not available), "auto" re-detects the best one, "" keeps the current one; returns the active one.
std::string select_isa(c10::string_view isa);

}  // namespace cpu
}  // namespace stm_cuda_ops
