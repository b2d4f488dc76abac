// Stand-in for the CUDA toolkit header <cuda_bf16.h> in the CPU emulation (see stm_cuda_emulation.h).
#pragma once
#include "stm_cuda_emulation.h"
