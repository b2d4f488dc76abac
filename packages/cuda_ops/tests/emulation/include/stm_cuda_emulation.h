// A small CPU emulation of the CUDA programming model, enough to run stm_cuda_ops' CUDA kernels
// (csrc/cuda/ms_deform_attn_cuda.cu) unchanged as host C++ inside the test suite.
//
// What it provides: the qualifiers (__global__, __device__, ...), dim3 and the built-in indices
// (blockIdx, threadIdx, blockDim, gridDim), a kernel launcher behind STM_LAUNCH (the .cu uses it in
// place of <<<...>>>) that checks the launch configuration like the driver does, warp shuffles
// (__shfl_sync/_xor/_down/_up), __syncwarp, __syncthreads, atomicAdd, the runtime calls the
// launchers use (cudaGetLastError, cudaGetErrorString) and __half / __nv_bfloat16 with their float
// conversions (round to nearest even, as the device intrinsics).
//
// How: every thread of a block is a fiber (ucontext) with its own stack. The scheduler runs each
// runnable thread until it finishes or reaches a synchronising call; a warp-synchronous call (a
// shuffle, __syncwarp) completes when every lane named in its mask has reached the same call site
// with the same mask, and then all of them exchange values at once, which is the lockstep a warp
// gives; __syncthreads completes when every thread of the block has reached it. Threads exchange
// nothing else between synchronisation points, so this is equivalent to lockstep execution for
// kernels that follow the CUDA rules. Protocol violations a GPU would turn into hangs or undefined
// values are reported as launch errors naming the lanes: a lane that exits or waits elsewhere
// while others wait in a shuffle, lanes at different call sites or with different masks, a lane
// outside its own mask, a deadlock. Blocks run one after the other in a configurable order (in
// order, or a seeded permutation), and the lanes between two synchronisation points run in
// ascending or descending order, so results that depend on the block or lane order show up.
//
// What it cannot show: timing and occupancy; races between blocks or between unsynchronised lanes
// (everything runs on one OS thread, so atomics are trivially atomic and there is no weak memory
// model); the GPU's floating-point contraction (nvcc fuses multiply-adds into FMAs, this build
// does not), fast-math intrinsics and the accuracy of device math functions; memory errors the
// hardware would trap (there is no bounds checking beyond what the host sanitizers give);
// architecture-specific code (__CUDA_ARCH__ is not defined) and inline PTX.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDART_VERSION 0  // "not a CUDA runtime"

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

// The built-in variables. The scheduler sets them before it resumes a thread (all threads run on
// one OS thread, and a thread only loses control inside a synchronising call).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------------------------
// Reduced-precision types: storage as on the device (IEEE binary16 / the upper half of a binary32),
// conversions in float.

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace stm_emu {

enum class Wait { kNone, kWarp, kBlock, kDone };
enum class Op { kIdx, kXor, kDown, kUp, kSyncWarp };

struct Lane {
  ucontext_t ctx;
  Wait wait = Wait::kNone;
  // The pending warp-synchronous call.
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  int arg = 0, width = 32;
  size_t size = 0;
  const void* site = nullptr;
  unsigned char in[16], out[16];
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, warp_collectives = 0, block_barriers = 0,
          atomics = 0;
  dim3 last_grid{0, 0, 0}, last_block{0, 0, 0};
};

struct Runtime {
  static constexpr size_t kStack = 64 * 1024;
  ucontext_t scheduler;
  std::vector<Lane> lanes;
  std::vector<std::unique_ptr<char[]>> stacks;
  Lane* current = nullptr;
  std::function<void()> body;
  cudaError_t last_error = cudaSuccess;
  std::string message;  // details of the last launch failure
  uint64_t seed = 0;    // 0: blocks in order, lanes ascending; else a seeded schedule
  int64_t max_blocks = int64_t(1) << 20;
  Stats stats;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void lane_entry() {
  Runtime& r = rt();
  r.body();
  r.current->wait = Wait::kDone;  // returns to the scheduler through uc_link
}

inline void set_error(cudaError_t e, const std::string& what) {
  Runtime& r = rt();
  if (r.last_error == cudaSuccess) {
    r.last_error = e;
    r.message = what;
  }
}

inline std::string lane_name(unsigned t) {
  std::ostringstream s;
  s << "thread " << t << " (warp " << t / 32 << ", lane " << t % 32 << ") of block ("
    << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << ")";
  return s.str();
}

inline int source_lane(const Lane& l, int lane) {
  const int w = l.width;
  const int base = lane & ~(w - 1);
  switch (l.op) {
    case Op::kIdx: return base + (l.arg % w);
    case Op::kXor: {
      const int src = lane ^ l.arg;
      return src < base + w ? src : lane;  // outside the segment: own value
    }
    case Op::kDown: return (lane - base) + l.arg < w ? lane + l.arg : lane;
    case Op::kUp: return (lane - base) - l.arg >= 0 ? lane - l.arg : lane;
    default: return lane;
  }
}

// Completes the pending warp-synchronous calls of warp w if every lane they name has arrived.
// Returns whether any lane was released; sets an error (and returns false) on a protocol breach.
inline bool resolve_warp(unsigned w, unsigned nthreads) {
  Runtime& r = rt();
  const unsigned first = 32 * w, last = std::min(nthreads, first + 32);
  int leader = -1;
  for (unsigned t = first; t < last; ++t) {
    if (r.lanes[t].wait == Wait::kWarp) {
      leader = static_cast<int>(t);
      break;
    }
  }
  if (leader < 0) return false;
  const Lane& L = r.lanes[leader];
  for (unsigned t = first; t < last; ++t) {
    const Lane& l = r.lanes[t];
    const bool named = (L.mask >> (t - first)) & 1u;
    if (l.wait == Wait::kWarp) {
      if (l.mask != L.mask || l.site != L.site || l.op != L.op || l.size != L.size) {
        set_error(cudaErrorLaunchFailure,
                  lane_name(t) + " waits in a different warp-synchronous call (call site, mask or "
                  "type) than " + lane_name(leader) + ": the lanes of a warp diverged");
        return false;
      }
      if (!named) {
        set_error(cudaErrorLaunchFailure,
                  lane_name(t) + " calls a warp-synchronous function with a mask that excludes itself");
        return false;
      }
    } else if (named) {
      std::ostringstream s;
      s << lane_name(t) << (l.wait == Wait::kDone ? " exited" : " waits in __syncthreads")
        << " while " << lane_name(leader) << " waits for it in a warp shuffle/__syncwarp (mask 0x"
        << std::hex << L.mask << "): undefined behaviour on a GPU (a hang or garbage)";
      set_error(cudaErrorLaunchFailure, s.str());
      return false;
    }
  }
  for (unsigned b = 0; b < 32; ++b) {
    if (((L.mask >> b) & 1u) && first + b >= last) {
      set_error(cudaErrorLaunchFailure, "a warp-synchronous mask names lanes past the end of the block");
      return false;
    }
  }
  ++r.stats.warp_collectives;
  for (unsigned t = first; t < last; ++t) {
    Lane& l = r.lanes[t];
    if (l.wait != Wait::kWarp) continue;
    if (l.op != Op::kSyncWarp) {
      const int src = source_lane(l, static_cast<int>(t - first));
      const bool src_named = (L.mask >> src) & 1u;
      std::memcpy(l.out, src_named ? r.lanes[first + src].in : l.in, l.size);
    }
    l.wait = Wait::kNone;
  }
  return true;
}

inline void run_block(unsigned nthreads, std::mt19937_64* rng) {
  Runtime& r = rt();
  if (r.lanes.size() < nthreads) r.lanes.resize(nthreads);
  while (r.stacks.size() < nthreads) r.stacks.emplace_back(new char[Runtime::kStack]);
  for (unsigned t = 0; t < nthreads; ++t) {
    Lane& l = r.lanes[t];
    l.wait = Wait::kNone;
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = r.stacks[t].get();
    l.ctx.uc_stack.ss_size = Runtime::kStack;
    l.ctx.uc_link = &r.scheduler;
    makecontext(&l.ctx, lane_entry, 0);
  }
  const unsigned bx = blockDim.x, bxy = blockDim.x * blockDim.y;
  bool descending = false;
  for (;;) {
    if (rng != nullptr) descending = ((*rng)() & 1u) != 0;
    for (unsigned i = 0; i < nthreads; ++i) {
      const unsigned t = descending ? nthreads - 1 - i : i;
      Lane& l = r.lanes[t];
      if (l.wait != Wait::kNone) continue;
      threadIdx = dim3(t % bx, (t / bx) % blockDim.y, t / bxy);
      r.current = &l;
      swapcontext(&r.scheduler, &l.ctx);
    }
    bool all_done = true, any_block = false, all_alive_at_block = true;
    for (unsigned t = 0; t < nthreads; ++t) {
      const Wait w = r.lanes[t].wait;
      all_done &= w == Wait::kDone;
      any_block |= w == Wait::kBlock;
      if (w != Wait::kDone && w != Wait::kBlock) all_alive_at_block = false;
    }
    if (all_done) return;
    bool released = false;
    for (unsigned w = 0; w * 32 < nthreads && r.last_error == cudaSuccess; ++w) {
      released |= resolve_warp(w, nthreads);
    }
    if (r.last_error != cudaSuccess) return;
    if (!released && any_block && all_alive_at_block) {
      for (unsigned t = 0; t < nthreads; ++t) {
        if (r.lanes[t].wait == Wait::kDone) {
          set_error(cudaErrorLaunchFailure,
                    lane_name(t) + " exited while other threads wait in __syncthreads");
          return;
        }
      }
      ++r.stats.block_barriers;
      for (unsigned t = 0; t < nthreads; ++t) r.lanes[t].wait = Wait::kNone;
      released = true;
    }
    if (!released) {
      set_error(cudaErrorLaunchFailure,
                "deadlock: no thread of block (" + std::to_string(blockIdx.x) + "," +
                    std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) +
                    ") can make progress (threads wait in different synchronising calls)");
      return;
    }
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t shmem) {
  Runtime& r = rt();
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 ||
      nthreads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u || shmem > 48 * 1024) {
    std::ostringstream s;
    s << "invalid launch configuration: grid (" << grid.x << "," << grid.y << "," << grid.z
      << "), block (" << block.x << "," << block.y << "," << block.z << "), " << shmem
      << " bytes of dynamic shared memory";
    set_error(cudaErrorInvalidConfiguration, s.str());
    return;
  }
  ++r.stats.launches;
  r.stats.last_grid = grid;
  r.stats.last_block = block;
  gridDim = grid;
  blockDim = block;
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::unique_ptr<std::mt19937_64> rng;
  if (r.seed != 0) {
    rng.reset(new std::mt19937_64(r.seed));
    std::shuffle(order.begin(), order.end(), *rng);
  }
  for (const uint64_t b : order) {
    blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                    static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y)));
    ++r.stats.blocks;
    r.stats.threads += static_cast<int64_t>(nthreads);
    run_block(static_cast<unsigned>(nthreads), rng.get());
    if (r.last_error != cudaSuccess) return;
  }
}

// STM_LAUNCH(kernel, grid, block, shmem, stream)(args...) runs the whole grid before returning.
struct Launch {
  dim3 grid, block;
  size_t shmem;
  const void* stream;  // ignored: everything runs synchronously, in launch order
  template <typename... P>
  struct Bound {
    const Launch& launch;
    void (*kernel)(P...);
    template <typename... Args>
    void operator()(Args&&... args) const {
      Runtime& r = rt();
      r.body = [&]() { kernel(args...); };  // each thread gets its own copies of the parameters
      run_grid(launch.grid, launch.block, launch.shmem);
      r.body = nullptr;
    }
  };
  template <typename... P>
  Bound<P...> with(void (*kernel)(P...)) const {
    return Bound<P...>{*this, kernel};
  }
};

// Blocks the calling thread until the warp-synchronous call completes (see resolve_warp).
template <typename T>
inline T warp_call(Op op, unsigned mask, T var, int arg, int width, const void* site) {
  static_assert(sizeof(T) <= 16, "shuffled type too large");
  Runtime& r = rt();
  Lane& l = *r.current;
  l.op = op;
  l.mask = mask;
  l.arg = arg;
  l.width = width;
  l.size = sizeof(T);
  l.site = site;
  std::memcpy(l.in, &var, sizeof(T));
  l.wait = Wait::kWarp;
  swapcontext(&l.ctx, &r.scheduler);
  T out = var;
  if (op != Op::kSyncWarp) std::memcpy(&out, l.out, sizeof(T));
  return out;
}

// Tests' controls (defined in the kernel translation unit, callable from the glue).
void configure(uint64_t seed, int64_t max_blocks);
Stats stats();
void reset_stats();

}  // namespace stm_emu

#define STM_CUDA_MAX_BLOCKS (::stm_emu::rt().max_blocks)
#define STM_LAUNCH(kernel, grid, block, shmem, stream) \
  ::stm_emu::Launch{dim3(grid), dim3(block), static_cast<size_t>(shmem),        \
                    static_cast<const void*>(stream)}                              \
      .with(kernel)

// The call site (return address) identifies which shuffle a lane waits in, hence noinline.
template <typename T>
__attribute__((noinline)) T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
  return stm_emu::warp_call(stm_emu::Op::kIdx, mask, var, src, width, __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return stm_emu::warp_call(stm_emu::Op::kXor, mask, var, lane_mask, width,
                            __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return stm_emu::warp_call(stm_emu::Op::kDown, mask, var, static_cast<int>(delta), width,
                            __builtin_return_address(0));
}
template <typename T>
__attribute__((noinline)) T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return stm_emu::warp_call(stm_emu::Op::kUp, mask, var, static_cast<int>(delta), width,
                            __builtin_return_address(0));
}
__attribute__((noinline)) inline void __syncwarp(unsigned mask = 0xffffffffu) {
  stm_emu::warp_call(stm_emu::Op::kSyncWarp, mask, 0, 0, 32, __builtin_return_address(0));
}
inline void __syncthreads() {
  stm_emu::Runtime& r = stm_emu::rt();
  r.current->wait = stm_emu::Wait::kBlock;
  swapcontext(&r.current->ctx, &r.scheduler);
}

template <typename T>
inline T atomicAdd(T* address, T val) {
  ++stm_emu::rt().stats.atomics;
  const T old = *address;
  *address = old + val;
  return old;
}

inline cudaError_t cudaGetLastError() {
  stm_emu::Runtime& r = stm_emu::rt();
  const cudaError_t e = r.last_error;
  r.last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  static thread_local std::string text;
  switch (e) {
    case cudaSuccess: text = "no error"; break;
    case cudaErrorInvalidValue: text = "invalid argument"; break;
    case cudaErrorInvalidConfiguration: text = "invalid configuration argument"; break;
    case cudaErrorLaunchFailure: text = "unspecified launch failure"; break;
    default: text = "error " + std::to_string(static_cast<int>(e)); break;
  }
  if (e != cudaSuccess && !stm_emu::rt().message.empty()) text += " (emulation: " + stm_emu::rt().message + ")";
  return text.c_str();
}
