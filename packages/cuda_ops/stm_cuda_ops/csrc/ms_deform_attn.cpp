// Multi-scale deformable attention: the operator schemas, the build information and the Python
// extension module stm_cuda_ops._C.
//
// Operators (namespace stm_cuda_ops, registered with the PyTorch dispatcher when the library loads):
//   ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                          attention_weights, im2col_step) -> output
//   ms_deform_attn_backward(..., grad_output, im2col_step) -> (grad_value, grad_loc, grad_attn)
//   _build_flags() -> str, _cpu_isa(str isa="") -> str (build information, CPU kernel set)
//
// Their kernels are registered by one file per backend, as torchvision's csrc/ops does:
//   ms_deform_attn_validate.{h,cpp}    the argument checks every backend runs
//   cpu/ms_deform_attn_cpu.cpp         CPU: instruction-set dispatch over cpu/cpu_kernel_*.cpp
//   cuda/ms_deform_attn_cuda_glue.cpp  CUDA (builds with STM_WITH_CUDA): launches
//                                      cuda/ms_deform_attn_cuda.cu through ms_deform_attn_cuda_launch
//   autocast/ms_deform_attn_autocast.cpp  AutocastCPU / AutocastCUDA: run in float32
// Autograd and the fake (meta) implementations are registered from Python (stm_cuda_ops/_ops.py).
#include <Python.h>

#include <c10/util/string_view.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "cpu/ms_deform_attn_cpu.h"
#include "ms_deform_attn_validate.h"

#ifdef STM_WITH_CUDA
#include "cuda/cuda_kernels.h"
#endif

namespace stm_cuda_ops {
namespace {

// Build information: "key=value;key=value".
std::string build_flags_op() {
  std::ostringstream s;
  s << "cpu_kernels=1;cpu_isa=" << cpu::active_isa() << ";cpu_isas=" << cpu::available_isas();
#ifdef STM_WITH_CUDA
  const int v = cuda::runtime_version_compiled();
  s << ";cuda_kernels=1;cuda_version=" << v / 1000 << "." << (v % 1000) / 10
    << ";cuda_archs=" << cuda::compiled_archs();
#else
  s << ";cuda_kernels=0";
#endif
#ifdef STM_FORCE_CUDA
  s << ";force_cuda=1";
#else
  s << ";force_cuda=0";
#endif
  return s.str();
}

// `_cpu_isa("avx2")` selects a CPU kernel set ("" keeps, "auto" re-detects); returns the active one.
std::string cpu_isa_op(c10::string_view isa) { return cpu::select_isa(isa); }

}  // namespace

TORCH_LIBRARY(stm_cuda_ops, m) {
  // Fake kernels and autograd are registered in Python; torch points users who load this library
  // without importing the package at the module that registers them.
  m.set_python_module("stm_cuda_ops._ops");
  m.def(stm_cuda_ops::kForwardSchema);
  m.def(stm_cuda_ops::kBackwardSchema);
  m.def("_build_flags() -> str", &build_flags_op);
  m.def("_cpu_isa(str isa=\"\") -> str", &cpu_isa_op);
}

}  // namespace stm_cuda_ops

// The Python extension module stm_cuda_ops._C (empty; loading it runs the registrations of this
// library's files).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                            // m_name
      "Compiled kernels of stm_cuda_ops (registered as torch.ops.stm_cuda_ops.*)",  // m_doc
      -1,                                                              // m_size
      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
