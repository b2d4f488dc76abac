// CUDA kernels of multi-scale deformable attention. No torch headers (see cuda_kernels.h).
//
// Mapping: one thread per output element (n, q, m, d), consecutive threads walk the D channels of
// one head, so value / output / grad_output accesses of a warp are contiguous. Arithmetic is in the
// accumulation type (float32 for float32/float16/bfloat16 inputs, float64 for float64).
//
// Backward: grad_value is accumulated with atomics (float32 or float64 buffer). The per-sample
// gradients of the attention weight and the sampling location are sums over the D channels of a
// head: the G = gcd(D, 32) lanes that hold consecutive channels of the same (n, q, m) reduce with
// warp shuffles, then one lane per group adds the partial sum atomically (a single add when D <= 32
// and D is a power of two).
//
// The sampling arithmetic (footprint, range test, corner weights and bounds, per-sample gradients)
// is bilinear.h, shared with the CPU kernels. Kernels are launched through STM_LAUNCH so that the
// test suite can compile this file as host C++ and run it on the CPU (tests/emulation/).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bilinear.h"
#include "cuda_kernels.h"

// The CPU emulation of the tests defines its own launcher; nvcc uses the triple-chevron syntax.
#ifndef STM_LAUNCH
#define STM_LAUNCH(kernel, grid, block, shmem, stream) kernel<<<grid, block, shmem, stream>>>
#endif

namespace stm_cuda_ops {
namespace cuda {
namespace {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void forward_kernel(const T* __restrict__ value, const int64_t* __restrict__ hw,
                               const int64_t* __restrict__ start, const T* __restrict__ loc,
                               const T* __restrict__ attn, T* __restrict__ out, Sizes s,
                               int64_t total) {
  using A = typename AccType<T>::type;
  const int64_t vstride = s.M * s.D;
  const int64_t LP = s.L * s.P;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += grid_stride) {
    const int64_t d = idx % s.D;
    const int64_t sm = idx / s.D;  // ((n * Lq + q) * M + m)
    const int64_t m = sm % s.M;
    const int64_t n = sm / s.M / s.Lq;
    const T* vnm = value + n * s.S * vstride + m * s.D + d;
    const T* lp = loc + sm * LP * 2;
    const T* ap = attn + sm * LP;
    A acc = 0;
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = hw[2 * l], W = hw[2 * l + 1];
      const T* vl = vnm + start[l] * vstride;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t k = l * s.P + p;
        A fx, fy;
        int64_t x0, y0;
        if (!bilinear::footprint<A, int64_t>(load(lp + 2 * k), load(lp + 2 * k + 1),
                                             static_cast<A>(W), static_cast<A>(H), x0, y0, fx, fy)) {
          continue;
        }
        A w00, w01, w10, w11;  // bilinear weights times the attention weight
        bilinear::corner_weights<A>(load(ap + k), fx, fy, w00, w01, w10, w11);
        const bilinear::Corners c = bilinear::corners<int64_t>(x0, y0, W, H);
        const int64_t o00 = bilinear::corner_offset<int64_t>(x0, y0, W) * vstride;
        if (c.c00()) acc += w00 * load(vl + o00);
        if (c.c01()) acc += w01 * load(vl + (o00 + vstride));
        if (c.c10()) acc += w10 * load(vl + (o00 + W * vstride));
        if (c.c11()) acc += w11 * load(vl + (o00 + W * vstride + vstride));
      }
    }
    store(out + idx, acc);
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ value, const int64_t* __restrict__ hw,
                                const int64_t* __restrict__ start, const T* __restrict__ loc,
                                const T* __restrict__ attn, const T* __restrict__ grad_out,
                                typename AccType<T>::type* __restrict__ grad_value,
                                typename AccType<T>::type* __restrict__ grad_loc,
                                typename AccType<T>::type* __restrict__ grad_attn, Sizes s,
                                int64_t total, int group) {
  using A = typename AccType<T>::type;
  const int64_t vstride = s.M * s.D;
  const int64_t LP = s.L * s.P;
  const int64_t grid_stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // The loop bound depends on the block only, so every lane of a warp runs the same iterations and
  // reaches every shuffle; lanes past the end mirror the last element and write nothing. Groups of
  // `group` lanes are aligned and total is a multiple of group, so a group is either fully active
  // or fully inactive.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < total;
       base += grid_stride) {
    const int64_t idx0 = base + threadIdx.x;
    const bool active = idx0 < total;
    const int64_t idx = active ? idx0 : total - 1;
    const int64_t d = idx % s.D;
    const int64_t sm = idx / s.D;
    const int64_t m = sm % s.M;
    const int64_t n = sm / s.M / s.Lq;
    const int64_t voff = n * s.S * vstride + m * s.D + d;
    const T* vnm = value + voff;
    A* gvnm = grad_value + voff;
    const T* lp = loc + sm * LP * 2;
    const T* ap = attn + sm * LP;
    const A g = load(grad_out + idx);
    for (int64_t l = 0; l < s.L; ++l) {
      const int64_t H = hw[2 * l], W = hw[2 * l + 1];
      const T* vl = vnm + start[l] * vstride;
      A* gvl = gvnm + start[l] * vstride;
      for (int64_t p = 0; p < s.P; ++p) {
        const int64_t k = l * s.P + p;
        A g_attn = 0, g_x = 0, g_y = 0;
        A fx, fy;
        int64_t x0, y0;
        if (bilinear::footprint<A, int64_t>(load(lp + 2 * k), load(lp + 2 * k + 1),
                                            static_cast<A>(W), static_cast<A>(H), x0, y0, fx, fy)) {
          const A a = load(ap + k);
          const bilinear::Corners c = bilinear::corners<int64_t>(x0, y0, W, H);
          const int64_t o00 = bilinear::corner_offset<int64_t>(x0, y0, W) * vstride;
          const int64_t o01 = o00 + vstride, o10 = o00 + W * vstride, o11 = o10 + vstride;
          const A v00 = c.c00() ? load(vl + o00) : static_cast<A>(0);
          const A v01 = c.c01() ? load(vl + o01) : static_cast<A>(0);
          const A v10 = c.c10() ? load(vl + o10) : static_cast<A>(0);
          const A v11 = c.c11() ? load(vl + o11) : static_cast<A>(0);
          // This lane's channel share of e_c = <grad_out, V(corner c)>; the shuffles below sum the
          // (linear) gradients over the channels of the head.
          bilinear::sample_grads<A>(a, fx, fy, static_cast<A>(W), static_cast<A>(H), g * v00,
                                    g * v01, g * v10, g * v11, g_attn, g_x, g_y);
          if (active) {
            A w00, w01, w10, w11;  // bilinear weights times a * g
            bilinear::corner_weights<A>(a * g, fx, fy, w00, w01, w10, w11);
            if (c.c00()) atomicAdd(gvl + o00, w00);
            if (c.c01()) atomicAdd(gvl + o01, w01);
            if (c.c10()) atomicAdd(gvl + o10, w10);
            if (c.c11()) atomicAdd(gvl + o11, w11);
          }
        }
        for (int off = group >> 1; off > 0; off >>= 1) {
          g_attn += __shfl_xor_sync(0xffffffffu, g_attn, off);
          g_x += __shfl_xor_sync(0xffffffffu, g_x, off);
          g_y += __shfl_xor_sync(0xffffffffu, g_y, off);
        }
        if (active && d % group == 0) {
          const int64_t j = sm * LP + k;
          atomicAdd(grad_attn + j, g_attn);
          atomicAdd(grad_loc + 2 * j, g_x);
          atomicAdd(grad_loc + 2 * j + 1, g_y);
        }
      }
    }
  }
}

constexpr int kThreads = 256;  // a multiple of 32 (the backward's shuffles rely on it)

// Grid size cap; the grid-stride loops cover the rest. The CPU emulation of the tests lowers it at
// run time, so that the loops run more than one iteration on small inputs.
#ifndef STM_CUDA_MAX_BLOCKS
#define STM_CUDA_MAX_BLOCKS (int64_t(1) << 20)
#endif

inline unsigned blocks_for(int64_t total) {
  const int64_t cap = STM_CUDA_MAX_BLOCKS;
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, cap));
}

inline int gcd32(int64_t d) {
  int g = 32;
  while (g > 1 && d % g != 0) g >>= 1;
  return g;
}

template <typename T>
int launch_forward(const Sizes& s, const void* value, const int64_t* hw, const int64_t* start,
                   const void* loc, const void* attn, void* out, cudaStream_t stream) {
  const int64_t total = s.N * s.Lq * s.M * s.D;
  if (total <= 0) return 0;
  STM_LAUNCH(forward_kernel<T>, blocks_for(total), kThreads, 0, stream)(
      static_cast<const T*>(value), hw, start, static_cast<const T*>(loc),
      static_cast<const T*>(attn), static_cast<T*>(out), s, total);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_backward(const Sizes& s, const void* value, const int64_t* hw, const int64_t* start,
                    const void* loc, const void* attn, const void* grad_out, void* grad_value,
                    void* grad_loc, void* grad_attn, cudaStream_t stream) {
  using A = typename AccType<T>::type;
  const int64_t total = s.N * s.Lq * s.M * s.D;
  if (total <= 0) return 0;
  STM_LAUNCH(backward_kernel<T>, blocks_for(total), kThreads, 0, stream)(
      static_cast<const T*>(value), hw, start, static_cast<const T*>(loc),
      static_cast<const T*>(attn), static_cast<const T*>(grad_out), static_cast<A*>(grad_value),
      static_cast<A*>(grad_loc), static_cast<A*>(grad_attn), s, total, gcd32(s.D));
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int forward(int dtype, const Sizes& s, const void* value, const int64_t* spatial_shapes,
            const int64_t* level_start_index, const void* loc, const void* attn, void* out,
            void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_forward<float>(s, value, spatial_shapes, level_start_index, loc, attn, out, st);
    case kFloat64:
      return launch_forward<double>(s, value, spatial_shapes, level_start_index, loc, attn, out, st);
    case kFloat16:
      return launch_forward<__half>(s, value, spatial_shapes, level_start_index, loc, attn, out, st);
    case kBFloat16:
      return launch_forward<__nv_bfloat16>(s, value, spatial_shapes, level_start_index, loc, attn,
                                           out, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

int backward(int dtype, const Sizes& s, const void* value, const int64_t* spatial_shapes,
             const int64_t* level_start_index, const void* loc, const void* attn,
             const void* grad_out, void* grad_value, void* grad_loc, void* grad_attn,
             void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return launch_backward<float>(s, value, spatial_shapes, level_start_index, loc, attn,
                                    grad_out, grad_value, grad_loc, grad_attn, st);
    case kFloat64:
      return launch_backward<double>(s, value, spatial_shapes, level_start_index, loc, attn,
                                     grad_out, grad_value, grad_loc, grad_attn, st);
    case kFloat16:
      return launch_backward<__half>(s, value, spatial_shapes, level_start_index, loc, attn,
                                     grad_out, grad_value, grad_loc, grad_attn, st);
    case kBFloat16:
      return launch_backward<__nv_bfloat16>(s, value, spatial_shapes, level_start_index, loc, attn,
                                            grad_out, grad_value, grad_loc, grad_attn, st);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int runtime_version_compiled() { return CUDART_VERSION; }

#define STM_STRINGIFY2(...) #__VA_ARGS__
#define STM_STRINGIFY(...) STM_STRINGIFY2(__VA_ARGS__)
const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return STM_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

}  // namespace cuda
}  // namespace stm_cuda_ops
