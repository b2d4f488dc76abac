// Multi-scale deformable attention: operator schemas and the torch glue (validation: op_glue.h) for the
// CPU kernels (cpu_kernel_*.cpp) and, when built with STM_WITH_CUDA, the CUDA kernels
// (ms_deform_attn_cuda.cu).
//
// Operators (namespace stm_cuda_ops, registered with the PyTorch dispatcher on import):
//   ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
//                          attention_weights, im2col_step) -> output
//   ms_deform_attn_backward(..., grad_output, im2col_step) -> (grad_value, grad_loc, grad_attn)
// Kernels: CPU, CUDA (optional), AutocastCPU / AutocastCUDA (run in float32). Autograd and the
// fake (meta) implementations are registered from Python (stm_cuda_ops/_ops.py).
//
// This file is also the Python extension module stm_cuda_ops._C: it defines an empty module whose
// only purpose is that `import stm_cuda_ops._C` loads the library and runs the registrations.
#include <Python.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "op_glue.h"

#ifdef STM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace stm_cuda_ops {
namespace {

// ---------------------------------------------------------------------------------------------
// CPU

bool cpu_has(const char* feature) {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  const std::string f(feature);
  if (f == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (f == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }
#else
  (void)feature;
#endif
  return false;
}

const cpu::KernelTable* table_for(const std::string& isa) {
  if (isa == "default") return cpu::kernels_default();
  if (isa == "avx2") return cpu_has("avx2") ? cpu::kernels_avx2() : nullptr;
  if (isa == "avx512") return cpu_has("avx512") ? cpu::kernels_avx512() : nullptr;
  return nullptr;
}

// Best kernels for this machine. ATen's choice (at::get_cpu_capability, which honours
// ATEN_CPU_CAPABILITY) caps it; STM_CPU_ISA=default|avx2|avx512 overrides it.
const cpu::KernelTable* best_table() {
  if (const char* env = std::getenv("STM_CPU_ISA")) {
    if (const cpu::KernelTable* t = table_for(env)) return t;
  }
  const std::string cap = at::get_cpu_capability();
  if (cap.find("AVX512") != std::string::npos) {
    if (const cpu::KernelTable* t = table_for("avx512")) return t;
  }
  if (cap.find("AVX512") != std::string::npos || cap.find("AVX2") != std::string::npos) {
    if (const cpu::KernelTable* t = table_for("avx2")) return t;
  }
  return cpu::kernels_default();
}

std::atomic<const cpu::KernelTable*> g_table{nullptr};

const cpu::KernelTable* current_table() {
  const cpu::KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

std::string available_isas() {
  std::string s = "default";
  if (table_for("avx2")) s += ",avx2";
  if (table_for("avx512")) s += ",avx512";
  return s;
}

// Debug/testing hook: `_cpu_isa("avx2")` selects a kernel set ("" keeps, "auto" re-detects);
// returns the active one.
std::string cpu_isa_op(c10::string_view isa) {
  const std::string want(isa.data(), isa.size());
  if (want == "auto") {
    g_table.store(best_table(), std::memory_order_release);
  } else if (!want.empty()) {
    const cpu::KernelTable* t = table_for(want);
    TORCH_CHECK(t != nullptr, kOpName, ": CPU kernel set '", want,
                "' is not available on this machine/build (available: ", available_isas(), ")");
    g_table.store(t, std::memory_order_release);
  }
  return current_table()->isa;
}

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor upcast(const at::Tensor& t) { return is_reduced_float(t.scalar_type()) ? t.to(at::kFloat) : t; }

template <typename T>
void run_forward_cpu(const Inputs& in, const at::Tensor& value, const at::Tensor& loc,
                     const at::Tensor& attn, at::Tensor& out) {
  const cpu::KernelTable* kt = current_table();
  cpu::ForwardFn<T> fn;
  if constexpr (std::is_same_v<T, float>) {
    fn = kt->forward_f32;
  } else {
    fn = kt->forward_f64;
  }
  const cpu::Geometry g = in.geometry();
  const T* v = value.data_ptr<T>();
  const T* l = loc.data_ptr<T>();
  const T* a = attn.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t rows = in.N * in.Lq;
  const int64_t work_per_row = std::max<int64_t>(1, in.M * in.L * in.P * std::max<int64_t>(in.D, 4));
  const int64_t grain = std::max<int64_t>(1, 32768 / work_per_row);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    fn(g, v, l, a, o, begin, end);
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const at::ScalarType dtype = in.value.scalar_type();
  const at::Tensor v = upcast(in.value), l = upcast(in.loc), a = upcast(in.attn);
  at::Tensor out = at::empty({in.N, in.Lq, in.M * in.D}, v.options());
  if (out.numel() > 0) {
    if (v.scalar_type() == at::kDouble) {
      run_forward_cpu<double>(in, v, l, a, out);
    } else {
      run_forward_cpu<float>(in, v, l, a, out);
    }
  }
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

template <typename T>
void run_backward_cpu(const Inputs& in, const at::Tensor& value, const at::Tensor& loc,
                      const at::Tensor& attn, const at::Tensor& grad_out, at::Tensor& grad_value,
                      at::Tensor& grad_loc, at::Tensor& grad_attn) {
  const cpu::KernelTable* kt = current_table();
  cpu::BackwardFn<T> fn;
  if constexpr (std::is_same_v<T, float>) {
    fn = kt->backward_f32;
  } else {
    fn = kt->backward_f64;
  }
  const cpu::Geometry g = in.geometry();
  // Race-free grad_value: a task owns the slice of one batch item. With fewer items than threads,
  // the queries of an item are split further and each extra split accumulates into a private
  // copy of grad_value, summed at the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  constexpr int64_t kMinQueriesPerSplit = 64;
  int64_t splits = 1;
  if (in.N < threads) {
    splits = std::min<int64_t>((threads + in.N - 1) / in.N, in.Lq / kMinQueriesPerSplit);
    splits = std::max<int64_t>(splits, 1);
  }
  at::Tensor extra;
  if (splits > 1) {
    std::vector<int64_t> size{splits - 1};
    size.insert(size.end(), grad_value.sizes().begin(), grad_value.sizes().end());
    extra = at::zeros(size, grad_value.options());
  }
  const T* v = value.data_ptr<T>();
  const T* l = loc.data_ptr<T>();
  const T* a = attn.data_ptr<T>();
  const T* go = grad_out.data_ptr<T>();
  T* gv = grad_value.data_ptr<T>();
  T* gv_extra = splits > 1 ? extra.data_ptr<T>() : nullptr;
  T* gl = grad_loc.data_ptr<T>();
  T* ga = grad_attn.data_ptr<T>();
  const int64_t gv_numel = grad_value.numel();
  at::parallel_for(0, in.N * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / splits, k = t % splits;
      const int64_t q0 = in.Lq * k / splits, q1 = in.Lq * (k + 1) / splits;
      T* target = k == 0 ? gv : gv_extra + (k - 1) * gv_numel;
      fn(g, v, l, a, go, target, gl, ga, n, q0, q1);
    }
  });
  if (splits > 1) grad_value.add_(extra.sum(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const at::Tensor grad_out_c = check_grad_output(in, grad_output);
  const at::ScalarType dtype = in.value.scalar_type();
  const at::Tensor v = upcast(in.value), l = upcast(in.loc), a = upcast(in.attn);
  const at::Tensor go = upcast(grad_out_c);
  at::Tensor grad_value = at::zeros(v.sizes(), v.options());
  at::Tensor grad_loc = at::empty(l.sizes(), l.options());
  at::Tensor grad_attn = at::empty(a.sizes(), a.options());
  if (in.N * in.Lq * in.M > 0 && grad_loc.numel() > 0) {  // else everything is empty or zero
    if (v.scalar_type() == at::kDouble) {
      run_backward_cpu<double>(in, v, l, a, go, grad_value, grad_loc, grad_attn);
    } else {
      run_backward_cpu<float>(in, v, l, a, go, grad_value, grad_loc, grad_attn);
    }
  }
  if (grad_value.scalar_type() != dtype) {
    return {grad_value.to(dtype), grad_loc.to(dtype), grad_attn.to(dtype)};
  }
  return {grad_value, grad_loc, grad_attn};
}

// ---------------------------------------------------------------------------------------------
// CUDA

#ifdef STM_WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const c10::cuda::CUDAGuard guard(in.value.device());
  return cuda_forward_launch(
      in, c10::cuda::getCurrentCUDAStream(in.value.device().index()).stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, int64_t im2col_step) {
  const Inputs in = check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                                 attention_weights, im2col_step);
  const at::Tensor go = check_grad_output(in, grad_output);
  const c10::cuda::CUDAGuard guard(in.value.device());
  return cuda_backward_launch(
      in, go, c10::cuda::getCurrentCUDAStream(in.value.device().index()).stream());
}
#endif  // STM_WITH_CUDA

// ---------------------------------------------------------------------------------------------
// Autocast: the op runs in float32 (float16/bfloat16 inputs are cast up, float64 is left alone,
// as torch.autocast does for its float32 ops), with autocast disabled inside.

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

// ---------------------------------------------------------------------------------------------
// Build information: "key=value;key=value".

std::string build_flags_op() {
  std::ostringstream s;
  s << "cpu_kernels=1;cpu_isa=" << current_table()->isa << ";cpu_isas=" << available_isas();
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

}  // namespace

TORCH_LIBRARY(stm_cuda_ops, m) {
  // Fake kernels and autograd are registered in Python; torch points users who load this library
  // without importing the package at the module that registers them.
  m.set_python_module("stm_cuda_ops._ops");
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, int im2col_step) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output, "
      "int im2col_step) -> (Tensor, Tensor, Tensor)");
  m.def("_build_flags() -> str", &build_flags_op);
  m.def("_cpu_isa(str isa=\"\") -> str", &cpu_isa_op);
}

TORCH_LIBRARY_IMPL(stm_cuda_ops, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

#ifdef STM_WITH_CUDA
TORCH_LIBRARY_IMPL(stm_cuda_ops, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}
#endif

TORCH_LIBRARY_IMPL(stm_cuda_ops, AutocastCPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_autocast);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_autocast);
}

TORCH_LIBRARY_IMPL(stm_cuda_ops, AutocastCUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_autocast);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_autocast);
}

}  // namespace stm_cuda_ops

// The Python extension module stm_cuda_ops._C (empty; loading it runs the registrations above).
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                            // m_name
      "Compiled kernels of stm_cuda_ops (registered as torch.ops.stm_cuda_ops.*)",  // m_doc
      -1,                                                              // m_size
      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
