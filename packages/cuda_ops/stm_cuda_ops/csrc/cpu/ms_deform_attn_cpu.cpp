// The CPU backend of multi-scale deformable attention: the instruction-set dispatch (which of the
// kernel sets cpu_kernel_{default,avx2,avx512}.cpp runs) and the dispatcher's CPU kernels around them
// (validation, float16/bfloat16 upcast, allocation, threading), registered for the ops of
// ms_deform_attn.cpp. The kernels (cpu_kernels.h) are plain C++; everything torch is here.
#include "cpu/ms_deform_attn_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "ms_deform_attn_validate.h"

namespace stm_cuda_ops {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// Instruction-set dispatch

namespace {

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

const KernelTable* table_for(const std::string& isa) {
  if (isa == "default") return kernels_default();
  if (isa == "avx2") return cpu_has("avx2") ? kernels_avx2() : nullptr;
  if (isa == "avx512") return cpu_has("avx512") ? kernels_avx512() : nullptr;
  return nullptr;
}

// Best kernels for this machine. ATen's choice (at::get_cpu_capability, which honours
// ATEN_CPU_CAPABILITY) caps it; STM_CPU_ISA=default|avx2|avx512 overrides it.
const KernelTable* best_table() {
  if (const char* env = std::getenv("STM_CPU_ISA")) {
    if (const KernelTable* t = table_for(env)) return t;
  }
  const std::string cap = at::get_cpu_capability();
  if (cap.find("AVX512") != std::string::npos) {
    if (const KernelTable* t = table_for("avx512")) return t;
  }
  if (cap.find("AVX512") != std::string::npos || cap.find("AVX2") != std::string::npos) {
    if (const KernelTable* t = table_for("avx2")) return t;
  }
  return kernels_default();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable* current_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

}  // namespace

const char* active_isa() { return current_table()->isa; }

std::string available_isas() {
  std::string s = "default";
  if (table_for("avx2")) s += ",avx2";
  if (table_for("avx512")) s += ",avx512";
  return s;
}

std::string select_isa(c10::string_view isa) {
  const std::string want(isa.data(), isa.size());
  if (want == "auto") {
    g_table.store(best_table(), std::memory_order_release);
  } else if (!want.empty()) {
    const KernelTable* t = table_for(want);
    TORCH_CHECK(t != nullptr, kOpName, ": CPU kernel set '", want,
                "' is not available on this machine/build (available: ", available_isas(), ")");
    g_table.store(t, std::memory_order_release);
  }
  return current_table()->isa;
}

}  // namespace cpu

// ---------------------------------------------------------------------------------------------
// Dispatcher kernels

namespace {

bool is_reduced_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

at::Tensor upcast(const at::Tensor& t) { return is_reduced_float(t.scalar_type()) ? t.to(at::kFloat) : t; }

template <typename T>
void run_forward_cpu(const Inputs& in, const at::Tensor& value, const at::Tensor& loc,
                     const at::Tensor& attn, at::Tensor& out) {
  const cpu::KernelTable* kt = cpu::current_table();
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
  const cpu::KernelTable* kt = cpu::current_table();
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

}  // namespace

TORCH_LIBRARY_IMPL(stm_cuda_ops, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace stm_cuda_ops
