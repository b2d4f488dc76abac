// The bilinear sampling arithmetic of multi-scale deformable attention, shared by the CPU kernels
// (cpu/cpu_kernel_impl.h) and the CUDA kernels (cuda/ms_deform_attn_cuda.cu).
//
// One definition of the footprint (range test, integer corner, fractional offsets), the corner
// weights, the corner bounds and the per-sample gradients, so that the CPU test suite (opcheck,
// gradcheck, fuzz against the reference) exercises exactly the arithmetic that runs on the GPU.
// Plain C++ with no library calls: under nvcc the functions are `__host__ __device__`, in a host
// compiler (the CPU kernels, the CUDA emulation of the tests) STM_HD expands to nothing. Everything
// is branch-free on purpose: the CPU kernels call these functions inside loops that GCC vectorises
// across samples, and on the GPU it avoids divergence.
//
// Conventions (README.md, "Semantics"): a sample at normalised (lx, ly) on a level of size H x W
// sits at pixel coordinates X = lx*W - 0.5, Y = ly*H - 0.5 (pixel centres at integers). It counts
// only if -1 < X < W and -1 < Y < H (strict). NaN or infinite coordinates fail this test, so they
// are out of range: zero contribution and zero gradient (the pure-PyTorch reference does the same).
#pragma once

#if defined(__CUDACC__)
#define STM_HD __host__ __device__ __forceinline__
#else
#define STM_HD inline
#endif

namespace stm_cuda_ops {
namespace bilinear {
// Internal linkage: cpu_kernel_avx2.cpp / cpu_kernel_avx512.cpp compile this header under a target
// pragma, and a shared (external) copy of an AVX2 build of these functions could otherwise be
// picked by the linker for the baseline kernels too.
namespace {

// Footprint of one sample. Returns whether it is in range. In range: x0/y0 = floor(X)/floor(Y)
// (from -1 to W-1 / H-1) and fx/fy = X - x0, Y - y0 in [0, 1). Out of range (NaN included): the
// coordinates are replaced by 0 before the integer conversion, which therefore never overflows or
// meets a NaN, and the outputs are x0 = y0 = 0, fx = fy = 0. For X in (-1, W), floor(X) is the
// truncation minus one below zero (no call to floor, which does not vectorise).
template <typename A, typename I>
STM_HD bool footprint(A lx, A ly, A W, A H, I& x0, I& y0, A& fx, A& fy) {
  const A X = lx * W - static_cast<A>(0.5);
  const A Y = ly * H - static_cast<A>(0.5);
  const bool inside = (X > static_cast<A>(-1)) & (X < W) & (Y > static_cast<A>(-1)) & (Y < H);
  const A Xs = inside ? X : static_cast<A>(0);
  const A Ys = inside ? Y : static_cast<A>(0);
  x0 = static_cast<I>(Xs) - static_cast<I>(Xs < static_cast<A>(0));
  y0 = static_cast<I>(Ys) - static_cast<I>(Ys < static_cast<A>(0));
  fx = Xs - static_cast<A>(x0);
  fy = Ys - static_cast<A>(y0);
  return inside;
}

// Bilinear weights of the corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1), scaled by a (the
// attention weight; pass 1 for the plain weights): w00 = a(1-fx)(1-fy), w01 = a fx(1-fy),
// w10 = a(1-fx)fy, w11 = a fx fy.
template <typename A>
STM_HD void corner_weights(A a, A fx, A fy, A& w00, A& w01, A& w10, A& w11) {
  const A ax = a * fx, agx = a - ax;  // a * lx', a * hx
  w00 = agx - agx * fy;
  w01 = ax - ax * fy;
  w10 = agx * fy;
  w11 = ax * fy;
}

// Which of the four corners of an in-range footprint lie inside the H x W map (pixels outside it
// read as zero and receive no gradient).
struct Corners {
  bool top, bottom, left, right;
  STM_HD bool c00() const { return top & left; }
  STM_HD bool c01() const { return top & right; }
  STM_HD bool c10() const { return bottom & left; }
  STM_HD bool c11() const { return bottom & right; }
  STM_HD bool all() const { return top & bottom & left & right; }
};

template <typename I>
STM_HD Corners corners(I x0, I y0, I W, I H) {
  return Corners{y0 >= 0, y0 + 1 < H, x0 >= 0, x0 + 1 < W};
}

// Offset (in pixels, before the stride of a pixel) of corner (y0,x0) in a row-major H x W map;
// the others follow at +1, +W, +W+1.
template <typename I>
STM_HD I corner_offset(I x0, I y0, I W) {
  return y0 * W + x0;
}

// Gradients of one sample given e_c = <grad_output, V(corner c)> (corners outside the map count
// as 0), the attention weight a and the fractional offsets:
//   d out / d a  = sum_c w_c e_c                                        (w_c unscaled)
//   d out / d lx = W * a * (hy (e01 - e00) + ly' (e11 - e10))           X = lx * W - 0.5
//   d out / d ly = H * a * (hx (e10 - e00) + lx' (e11 - e01))           Y = ly * H - 0.5
// Linear in e, so the CUDA kernel applies it per channel (e_c = g_d * v_c,d) and sums the results
// over the channels afterwards, while the CPU kernel applies it once to the channel sums.
template <typename A>
STM_HD void sample_grads(A a, A fx, A fy, A W, A H, A e00, A e01, A e10, A e11, A& g_attn,
                         A& g_lx, A& g_ly) {
  const A hx = static_cast<A>(1) - fx, hy = static_cast<A>(1) - fy;
  g_attn = hy * (hx * e00 + fx * e01) + fy * (hx * e10 + fx * e11);
  g_lx = W * a * (hy * (e01 - e00) + fy * (e11 - e10));
  g_ly = H * a * (hx * (e10 - e00) + fx * (e11 - e01));
}

}  // namespace
}  // namespace bilinear
}  // namespace stm_cuda_ops
