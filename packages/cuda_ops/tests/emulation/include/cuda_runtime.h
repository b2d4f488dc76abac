// Stand-in for the CUDA toolkit header <cuda_runtime.h> in the CPU emulation (see stm_cuda_emulation.h).
#pragma once
#include "stm_cuda_emulation.h"
