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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_kernels.h"

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

// Bilinear footprint; false when the sample is out of range (strict -1 < X < W, -1 < Y < H; NaN
// fails too).
template <typename A>
__device__ __forceinline__ bool locate(A lx, A ly, int64_t H, int64_t W, A& fx, A& fy,
                                       int64_t& x0, int64_t& y0) {
  const A X = lx * static_cast<A>(W) - static_cast<A>(0.5);
  const A Y = ly * static_cast<A>(H) - static_cast<A>(0.5);
  if (!(Y > static_cast<A>(-1) && Y < static_cast<A>(H) && X > static_cast<A>(-1) &&
        X < static_cast<A>(W))) {
    return false;
  }
  const A xf = floor(X);
  const A yf = floor(Y);
  x0 = static_cast<int64_t>(xf);
  y0 = static_cast<int64_t>(yf);
  fx = X - xf;
  fy = Y - yf;
  return true;
}

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
        if (!locate<A>(load(lp + 2 * k), load(lp + 2 * k + 1), H, W, fx, fy, x0, y0)) continue;
        const A gx = static_cast<A>(1) - fx, gy = static_cast<A>(1) - fy;
        A v = 0;
        if (y0 >= 0) {
          if (x0 >= 0) v += gy * gx * load(vl + (y0 * W + x0) * vstride);
          if (x0 + 1 < W) v += gy * fx * load(vl + (y0 * W + x0 + 1) * vstride);
        }
        if (y0 + 1 < H) {
          if (x0 >= 0) v += fy * gx * load(vl + ((y0 + 1) * W + x0) * vstride);
          if (x0 + 1 < W) v += fy * fx * load(vl + ((y0 + 1) * W + x0 + 1) * vstride);
        }
        acc += load(ap + k) * v;
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
        if (locate<A>(load(lp + 2 * k), load(lp + 2 * k + 1), H, W, fx, fy, x0, y0)) {
          const A a = load(ap + k);
          const A gx = static_cast<A>(1) - fx, gy = static_cast<A>(1) - fy;
          const bool top = y0 >= 0, bottom = y0 + 1 < H, left = x0 >= 0, right = x0 + 1 < W;
          const int64_t o00 = (y0 * W + x0) * vstride, o01 = o00 + vstride;
          const int64_t o10 = o00 + W * vstride, o11 = o10 + vstride;
          const A v00 = (top && left) ? load(vl + o00) : static_cast<A>(0);
          const A v01 = (top && right) ? load(vl + o01) : static_cast<A>(0);
          const A v10 = (bottom && left) ? load(vl + o10) : static_cast<A>(0);
          const A v11 = (bottom && right) ? load(vl + o11) : static_cast<A>(0);
          const A w00 = gy * gx, w01 = gy * fx, w10 = fy * gx, w11 = fy * fx;
          g_attn = g * (w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11);
          g_x = g * a * static_cast<A>(W) * (gy * (v01 - v00) + fy * (v11 - v10));
          g_y = g * a * static_cast<A>(H) * (gx * (v10 - v00) + fx * (v11 - v01));
          if (active) {
            const A ag = a * g;
            if (top && left) atomicAdd(gvl + o00, ag * w00);
            if (top && right) atomicAdd(gvl + o01, ag * w01);
            if (bottom && left) atomicAdd(gvl + o10, ag * w10);
            if (bottom && right) atomicAdd(gvl + o11, ag * w11);
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
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

inline unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks));
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
  forward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
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
  backward_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
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
