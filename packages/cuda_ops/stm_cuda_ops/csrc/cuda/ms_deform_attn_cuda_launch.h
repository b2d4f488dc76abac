// The at::Tensor side of the CUDA launchers (cuda_kernels.h): output and float32 accumulation
// buffers, the dtype mapping and the error reporting.
//
// Shared by the CUDA backend (ms_deform_attn_cuda_glue.cpp) and the CPU emulation of the CUDA
// kernels that the test suite builds (tests/emulation/emulated_op.cpp), so that the emulated kernels
// are launched through exactly the host code a GPU runs. `stream` is a cudaStream_t (the emulation
// ignores it); the caller has made the tensors' device current.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "ms_deform_attn_validate.h"

namespace stm_cuda_ops {

at::Tensor cuda_forward_launch(const Inputs& in, void* stream);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_backward_launch(const Inputs& in,
                                                                    const at::Tensor& go,
                                                                    void* stream);

}  // namespace stm_cuda_ops
