// CPU kernels of multi-scale deformable attention (templates).
//
// Included once per instruction set by cpu_kernel_{default,avx2,avx512}.cpp, each of which sets
// STM_ISA_NS (the namespace the code lands in) and, for the SIMD builds, a target pragma before
// including this file. Everything here is plain C++ (no torch), single-threaded: the caller splits
// the work into disjoint pieces and runs them in parallel.
//
// Semantics (see README.md): for a sample at normalised (lx, ly) of a level of size H x W,
// X = lx*W - 0.5 and Y = ly*H - 0.5 (pixel centres at integers). The sample contributes only if
// -1 < X < W and -1 < Y < H (strict); it is then the bilinear interpolation of the four
// neighbouring pixels, where pixels outside the map count as zero. Out-of-range samples
// contribute nothing to the output and receive zero gradient. Sums run over levels (outer) and
// points (inner).
//
// Work is done one output row (n, q) at a time, over its J = M*L*P samples, in passes:
//   1. footprints: integer corner and fractional offsets of all J samples, branch-free so that the
//      compiler vectorises it across samples (the per-sample scalar work dominates otherwise);
//   2. the channel work per sample: bilinear gathers (forward), or four dot products with
//      grad_output plus the scatter into grad_value (backward). The channel loops run over the D
//      contiguous channels of one head and vectorise; D is a compile-time constant for common
//      head sizes (D = 16 float32 is one AVX-512 register). Corners outside the map read a row of
//      zeros and write to private dump rows, so the channel loops have no branches;
//   3. (backward) the per-sample gradients of the weights and locations, vectorised across
//      samples again.
#pragma once

#ifndef STM_ISA_NS
#error "define STM_ISA_NS before including cpu_kernel_impl.h"
#endif

#include "bilinear.h"

namespace stm_cuda_ops {
namespace cpu {
namespace STM_ISA_NS {

constexpr int32_t kOutside = INT32_MIN;  // x0 of a sample that is out of range

// Per-call constants, with the level values tiled over the J = M*L*P samples of a row.
template <typename T>
struct Layout {
  int64_t D, M, LP, J, vstride;
  std::vector<T> Wf, Hf;          // (J): W_l, H_l of sample j as T
  std::vector<int64_t> W, H, st;  // (LP): W_l, H_l, start row of level l, for k = l*P + p

  Layout(const Geometry& g, int64_t d)
      : D(d), M(g.M), LP(g.L * g.P), J(g.M * g.L * g.P), vstride(g.M * d) {
    Wf.resize(static_cast<size_t>(J));
    Hf.resize(static_cast<size_t>(J));
    W.resize(static_cast<size_t>(LP));
    H.resize(static_cast<size_t>(LP));
    st.resize(static_cast<size_t>(LP));
    for (int64_t k = 0; k < LP; ++k) {
      const int64_t l = k / g.P;
      H[k] = g.hw[2 * l];
      W[k] = g.hw[2 * l + 1];
      st[k] = g.start[l];
    }
    for (int64_t j = 0; j < J; ++j) {
      Wf[j] = static_cast<T>(W[j % LP]);
      Hf[j] = static_cast<T>(H[j % LP]);
    }
  }
};

// Pass 1. For each sample j: x0/y0 = floor of the pixel coordinates and fx/fy = the fractional
// parts, or x0 = kOutside when the sample is out of range (NaN and infinities included). The
// arithmetic is bilinear::footprint, shared with the CUDA kernels; it is branch-free, so this loop
// vectorises across samples.
template <typename T>
inline void footprints(const T* __restrict__ loc, const T* __restrict__ Wf,
                       const T* __restrict__ Hf, int64_t J, int32_t* __restrict__ x0,
                       int32_t* __restrict__ y0, T* __restrict__ fx, T* __restrict__ fy) {
  for (int64_t j = 0; j < J; ++j) {
    int32_t xi, yi;
    T fxj, fyj;
    const bool inside =
        bilinear::footprint<T, int32_t>(loc[2 * j], loc[2 * j + 1], Wf[j], Hf[j], xi, yi, fxj, fyj);
    fx[j] = fxj;
    fy[j] = fyj;
    x0[j] = inside ? xi : kOutside;
    y0[j] = yi;
  }
}

// Rows of the four corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1) of a level whose pixel
// (y, x) is at base + (y*W + x)*stride; a corner outside the map gets outside[c] instead.
template <typename P>
inline void corner_rows(int64_t x0, int64_t y0, int64_t W, int64_t H, P* base, int64_t stride,
                        P* const* outside, P** rows) {
  const int64_t o = bilinear::corner_offset<int64_t>(x0, y0, W) * stride;
  const bilinear::Corners c = bilinear::corners<int64_t>(x0, y0, W, H);
  if (c.all()) {
    rows[0] = base + o;
    rows[1] = rows[0] + stride;
    rows[2] = rows[0] + W * stride;
    rows[3] = rows[2] + stride;
  } else {
    rows[0] = c.c00() ? base + o : outside[0];
    rows[1] = c.c01() ? base + (o + stride) : outside[1];
    rows[2] = c.c10() ? base + (o + W * stride) : outside[2];
    rows[3] = c.c11() ? base + (o + W * stride + stride) : outside[3];
  }
}

template <typename T, int DC>
void forward_impl(const Geometry& g, const T* value, const T* loc, const T* attn, T* out,
                  int64_t row_begin, int64_t row_end) {
  const Layout<T> lay(g, DC > 0 ? DC : g.D);
  const int64_t D = DC > 0 ? DC : lay.D;
  const int64_t J = lay.J, LP = lay.LP, vstride = lay.vstride;
  std::vector<int32_t> x0(static_cast<size_t>(J)), y0(static_cast<size_t>(J));
  std::vector<T> fx(static_cast<size_t>(J)), fy(static_cast<size_t>(J));
  std::vector<T> zero_row(static_cast<size_t>(D), T(0));
  const T* const zeros[4] = {zero_row.data(), zero_row.data(), zero_row.data(), zero_row.data()};

  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / g.Lq;
    const T* vn = value + n * g.S * vstride;
    const T* arow = attn + row * J;
    T* orow = out + row * vstride;
    footprints<T>(loc + row * J * 2, lay.Wf.data(), lay.Hf.data(), J, x0.data(), y0.data(),
                  fx.data(), fy.data());
    for (int64_t m = 0; m < g.M; ++m) {
      T acc_local[DC > 0 ? DC : 1];
      T* acc = DC > 0 ? acc_local : orow + m * D;  // runtime D: accumulate in the output row
      for (int64_t d = 0; d < D; ++d) acc[d] = T(0);
      const T* vm = vn + m * D;
      for (int64_t k = 0; k < LP; ++k) {
        const int64_t j = m * LP + k;
        if (x0[j] == kOutside) continue;
        T w00, w01, w10, w11;  // bilinear weights times the attention weight
        bilinear::corner_weights<T>(arow[j], fx[j], fy[j], w00, w01, w10, w11);
        const T* v[4];
        corner_rows<const T>(x0[j], y0[j], lay.W[k], lay.H[k], vm + lay.st[k] * vstride, vstride,
                             zeros, v);
        for (int64_t d = 0; d < D; ++d) {
          acc[d] += w00 * v[0][d] + w01 * v[1][d] + w10 * v[2][d] + w11 * v[3][d];
        }
      }
      if (DC > 0) {
        T* o = orow + m * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d];
      }
    }
  }
}

template <typename T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T c, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += c * x[d];
}

// Four dot products of length D sharing the first vector: e[c] = sum_d g[d] * v_c[d].
template <typename T>
inline void dot4(const T* g, const T* v0, const T* v1, const T* v2, const T* v3, int64_t D,
                 T* e) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T gd = g[d];
    s0 += gd * v0[d];
    s1 += gd * v1[d];
    s2 += gd * v2[d];
    s3 += gd * v3[d];
  }
  e[0] = s0;
  e[1] = s1;
  e[2] = s2;
  e[3] = s3;
}

#if defined(STM_USE_AVX2_INTRINSICS)
// float32: 8-lane (and, with AVX-512, 16-lane) partial sums, then one transposed horizontal
// reduction of the four accumulators (the compiler would reduce each one lane by lane).
template <>
inline void dot4<float>(const float* g, const float* v0, const float* v1, const float* v2,
                        const float* v3, int64_t D, float* e) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  int64_t d = 0;
#if defined(STM_USE_AVX512_INTRINSICS)
  if (D >= 16) {
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(),
           b3 = _mm512_setzero_ps();
    for (; d + 16 <= D; d += 16) {
      const __m512 gd = _mm512_loadu_ps(g + d);
      b0 = _mm512_fmadd_ps(gd, _mm512_loadu_ps(v0 + d), b0);
      b1 = _mm512_fmadd_ps(gd, _mm512_loadu_ps(v1 + d), b1);
      b2 = _mm512_fmadd_ps(gd, _mm512_loadu_ps(v2 + d), b2);
      b3 = _mm512_fmadd_ps(gd, _mm512_loadu_ps(v3 + d), b3);
    }
    a0 = _mm256_add_ps(_mm512_castps512_ps256(b0), _mm512_extractf32x8_ps(b0, 1));
    a1 = _mm256_add_ps(_mm512_castps512_ps256(b1), _mm512_extractf32x8_ps(b1, 1));
    a2 = _mm256_add_ps(_mm512_castps512_ps256(b2), _mm512_extractf32x8_ps(b2, 1));
    a3 = _mm256_add_ps(_mm512_castps512_ps256(b3), _mm512_extractf32x8_ps(b3, 1));
  }
#endif
  for (; d + 8 <= D; d += 8) {
    const __m256 gd = _mm256_loadu_ps(g + d);
    a0 = _mm256_fmadd_ps(gd, _mm256_loadu_ps(v0 + d), a0);
    a1 = _mm256_fmadd_ps(gd, _mm256_loadu_ps(v1 + d), a1);
    a2 = _mm256_fmadd_ps(gd, _mm256_loadu_ps(v2 + d), a2);
    a3 = _mm256_fmadd_ps(gd, _mm256_loadu_ps(v3 + d), a3);
  }
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  _mm_storeu_ps(e, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  for (; d < D; ++d) {
    const float gd = g[d];
    e[0] += gd * v0[d];
    e[1] += gd * v1[d];
    e[2] += gd * v2[d];
    e[3] += gd * v3[d];
  }
}
#endif

template <typename T, int DC>
void backward_impl(const Geometry& g, const T* value, const T* loc, const T* attn,
                   const T* grad_out, T* grad_value, T* grad_loc, T* grad_attn, int64_t n,
                   int64_t q_begin, int64_t q_end) {
  const Layout<T> lay(g, DC > 0 ? DC : g.D);
  const int64_t D = DC > 0 ? DC : lay.D;
  const int64_t J = lay.J, LP = lay.LP, vstride = lay.vstride;
  std::vector<int32_t> x0(static_cast<size_t>(J)), y0(static_cast<size_t>(J));
  std::vector<T> fx(static_cast<size_t>(J)), fy(static_cast<size_t>(J));
  std::vector<T> dots(static_cast<size_t>(4 * J), T(0));  // e_c of each sample
  // Row 0: zeros (never written). Rows 1..4: write-only dumps for the four corners.
  std::vector<T> scratch(static_cast<size_t>(5 * D), T(0));
  const T* const zeros[4] = {scratch.data(), scratch.data(), scratch.data(), scratch.data()};
  T* const dump[4] = {scratch.data() + D, scratch.data() + 2 * D, scratch.data() + 3 * D,
                      scratch.data() + 4 * D};
  const T* vn = value + n * g.S * vstride;
  T* gvn = grad_value + n * g.S * vstride;

  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t row = n * g.Lq + q;
    const T* arow = attn + row * J;
    footprints<T>(loc + row * J * 2, lay.Wf.data(), lay.Hf.data(), J, x0.data(), y0.data(),
                  fx.data(), fy.data());
    // Pass 2: dot products with grad_output and the scatter into grad_value.
    for (int64_t m = 0; m < g.M; ++m) {
      const T* go = grad_out + row * vstride + m * D;
      const T* vm = vn + m * D;
      T* gvm = gvn + m * D;
      for (int64_t k = 0; k < LP; ++k) {
        const int64_t j = m * LP + k;
        if (x0[j] == kOutside) continue;
        const int64_t base = lay.st[k] * vstride;
        const T* v[4];
        T* gv[4];
        corner_rows<const T>(x0[j], y0[j], lay.W[k], lay.H[k], vm + base, vstride, zeros, v);
        corner_rows<T>(x0[j], y0[j], lay.W[k], lay.H[k], gvm + base, vstride, dump, gv);
        dot4<T>(go, v[0], v[1], v[2], v[3], D, dots.data() + 4 * j);
        T w00, w01, w10, w11;
        bilinear::corner_weights<T>(arow[j], fx[j], fy[j], w00, w01, w10, w11);
        axpy<T>(gv[0], go, w00, D);
        axpy<T>(gv[1], go, w01, D);
        axpy<T>(gv[2], go, w10, D);
        axpy<T>(gv[3], go, w11, D);
      }
    }
    // Pass 3: the per-sample gradients from e_c = <grad_out, V(corner c)> (zero for corners
    // outside the map): bilinear::sample_grads, vectorised across samples.
    const T* e = dots.data();
    T* gl = grad_loc + row * J * 2;
    T* ga = grad_attn + row * J;
    for (int64_t j = 0; j < J; ++j) {
      T g_attn, g_lx, g_ly;
      bilinear::sample_grads<T>(arow[j], fx[j], fy[j], lay.Wf[j], lay.Hf[j], e[4 * j],
                                e[4 * j + 1], e[4 * j + 2], e[4 * j + 3], g_attn, g_lx, g_ly);
      ga[j] = g_attn;
      gl[2 * j] = g_lx;
      gl[2 * j + 1] = g_ly;
    }
    for (int64_t j = 0; j < J; ++j) {  // out-of-range samples: exactly zero
      if (x0[j] == kOutside) {
        ga[j] = T(0);
        gl[2 * j] = T(0);
        gl[2 * j + 1] = T(0);
      }
    }
  }
}

template <typename T>
void forward(const Geometry& g, const T* value, const T* loc, const T* attn, T* out,
             int64_t row_begin, int64_t row_end) {
  switch (g.D) {
    case 8: return forward_impl<T, 8>(g, value, loc, attn, out, row_begin, row_end);
    case 16: return forward_impl<T, 16>(g, value, loc, attn, out, row_begin, row_end);
    case 32: return forward_impl<T, 32>(g, value, loc, attn, out, row_begin, row_end);
    case 64: return forward_impl<T, 64>(g, value, loc, attn, out, row_begin, row_end);
    default: return forward_impl<T, 0>(g, value, loc, attn, out, row_begin, row_end);
  }
}

template <typename T>
void backward(const Geometry& g, const T* value, const T* loc, const T* attn, const T* grad_out,
              T* grad_value, T* grad_loc, T* grad_attn, int64_t n, int64_t q_begin,
              int64_t q_end) {
#define STM_BACKWARD_CASE(DC)                                                                   \
  return backward_impl<T, DC>(g, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, n, \
                              q_begin, q_end)
  switch (g.D) {
    case 8: STM_BACKWARD_CASE(8);
    case 16: STM_BACKWARD_CASE(16);
    case 32: STM_BACKWARD_CASE(32);
    case 64: STM_BACKWARD_CASE(64);
    default: STM_BACKWARD_CASE(0);
  }
#undef STM_BACKWARD_CASE
}

// Constant-initialised (no code runs to build it), so it is safe to reference from any CPU.
static const KernelTable table = {
    STM_ISA_NAME, &forward<float>, &forward<double>, &backward<float>, &backward<double>,
};

}  // namespace STM_ISA_NS
}  // namespace cpu
}  // namespace stm_cuda_ops
