// The CUDA kernels of stm_cuda_ops, compiled unchanged as host C++ against the CPU emulation of
// the CUDA programming model (include/stm_cuda_emulation.h; include/cuda_*.h stand in for the
// toolkit headers). Built by the tests (emulated.py), never by setup.py.
#include "stm_cuda_emulation.h"

#include "cuda/ms_deform_attn_cuda.cu"

namespace stm_emu {

void configure(uint64_t seed, int64_t max_blocks) {
  rt().seed = seed;
  rt().max_blocks = max_blocks;
}

Stats stats() { return rt().stats; }

void reset_stats() { rt().stats = Stats{}; }

}  // namespace stm_emu

namespace stm_emu {

std::vector<int64_t> stats_vector() {
  const Stats s = rt().stats;
  return {s.launches, s.blocks, s.threads, s.warp_collectives, s.block_barriers, s.atomics,
          static_cast<int64_t>(s.last_grid.x), static_cast<int64_t>(s.last_block.x)};
}

}  // namespace stm_emu

// ------------------------------------------------------------------------------------------------
// Self-tests of the emulation itself: small kernels with a known result, and kernels that break
// the warp-synchronous rules, which the emulation must report instead of computing something.

namespace stm_emu {
namespace selftest {

// Butterfly sum of the lane ids over each warp: every lane must end with 0 + 1 + ... + 31 = 496.
__global__ void xor_sum(int* out) {
  int v = static_cast<int>(threadIdx.x % 32);
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

// Tree sum with __shfl_down_sync: lane 0 of each warp holds the warp's sum of (thread id).
__global__ void down_sum(long long* out) {
  long long v = static_cast<long long>(blockIdx.x * blockDim.x + threadIdx.x);
  for (unsigned off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) out[(blockIdx.x * blockDim.x + threadIdx.x) / 32] = v;
}

// Block-wide exchange through shared memory: thread t reads what thread (n - 1 - t) wrote.
__global__ void reverse_in_block(const int* in, int* out) {
  __shared__ int buffer[1024];
  const unsigned t = threadIdx.x;
  buffer[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buffer[blockDim.x - 1 - t];
}

// Lane 3 leaves before the shuffle the others wait in (a hang or garbage on a GPU).
__global__ void early_exit(int* out) {
  if (threadIdx.x % 32 == 3) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Lanes 0-15 and 16-31 reach two different shuffle call sites with the full mask.
__global__ void diverged(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

__global__ void nothing(int*) {}

}  // namespace selftest

// Returns "ok" or a description of what went wrong (the launch error text for the broken kernels).
std::string run_selftest(const std::string& name) {
  using namespace selftest;
  cudaGetLastError();  // clear
  auto error_text = [](cudaError_t e) { return std::string(cudaGetErrorString(e)); };
  if (name == "xor_sum") {
    std::vector<int> out(3 * 64, -1);
    STM_LAUNCH(xor_sum, 3, 64, 0, nullptr)(out.data());
    if (const cudaError_t e = cudaGetLastError()) return error_text(e);
    for (int v : out) {
      if (v != 496) return "xor_sum: got " + std::to_string(v) + ", expected 496";
    }
    return "ok";
  }
  if (name == "down_sum") {
    std::vector<long long> out(4 * 128 / 32, -1);
    STM_LAUNCH(down_sum, 4, 128, 0, nullptr)(out.data());
    if (const cudaError_t e = cudaGetLastError()) return error_text(e);
    for (size_t w = 0; w < out.size(); ++w) {
      const long long first = static_cast<long long>(32 * w), want = 32 * first + 496;
      if (out[w] != want) {
        return "down_sum: warp " + std::to_string(w) + " got " + std::to_string(out[w]) +
               ", expected " + std::to_string(want);
      }
    }
    return "ok";
  }
  if (name == "reverse_in_block") {
    std::vector<int> in(2 * 96), out(2 * 96, -1);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i);
    STM_LAUNCH(reverse_in_block, 2, 96, 0, nullptr)(in.data(), out.data());
    if (const cudaError_t e = cudaGetLastError()) return error_text(e);
    for (int b = 0; b < 2; ++b) {
      for (int t = 0; t < 96; ++t) {
        if (out[b * 96 + t] != b * 96 + 95 - t) return "reverse_in_block: wrong value at " + std::to_string(b * 96 + t);
      }
    }
    return "ok";
  }
  std::vector<int> out(64, 0);
  if (name == "early_exit") {
    STM_LAUNCH(early_exit, 1, 64, 0, nullptr)(out.data());
  } else if (name == "diverged") {
    STM_LAUNCH(diverged, 1, 64, 0, nullptr)(out.data());
  } else if (name == "bad_config") {
    STM_LAUNCH(nothing, 1, 2048, 0, nullptr)(out.data());
  } else {
    return "unknown self-test " + name;
  }
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string("no error reported") : error_text(e);
}

}  // namespace stm_emu
