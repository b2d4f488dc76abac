"""Build of stm_cuda_ops._C (multi-scale deformable attention kernels).

The CPU kernels are always built. The CUDA kernels are added when FORCE_CUDA=1, or when FORCE_CUDA
is unset and a CUDA device and toolkit are both present (FORCE_CUDA=0 disables them). Compiles with
ninja through torch.utils.cpp_extension; MAX_JOBS bounds its parallelism. Install with

    pip install --no-deps --no-build-isolation -e packages/cuda_ops

(`--no-build-isolation`: the extension must be compiled against the torch it will be imported with).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# csrc is laid out by backend, as torchvision's csrc/ops: the schemas and module (ms_deform_attn.cpp),
# the argument checks, cpu/, cuda/ and autocast/. Includes are relative to csrc.
CSRC = "stm_cuda_ops/csrc"
INCLUDE_DIRS = [os.path.join(os.path.dirname(os.path.abspath(__file__)), CSRC)]
CPU_SOURCES = [
    f"{CSRC}/ms_deform_attn.cpp",
    f"{CSRC}/ms_deform_attn_validate.cpp",
    f"{CSRC}/cpu/ms_deform_attn_cpu.cpp",
    f"{CSRC}/cpu/cpu_kernel_default.cpp",
    f"{CSRC}/cpu/cpu_kernel_avx2.cpp",
    f"{CSRC}/cpu/cpu_kernel_avx512.cpp",
    f"{CSRC}/autocast/ms_deform_attn_autocast.cpp",
]
CUDA_SOURCES = [
    f"{CSRC}/cuda/ms_deform_attn_cuda_glue.cpp",
    f"{CSRC}/cuda/ms_deform_attn_cuda_launch.cpp",
    f"{CSRC}/cuda/ms_deform_attn_cuda.cu",
]


def _with_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA", "").strip()
    if force == "1":
        if CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)"
            )
        return True
    if force == "0":
        return False
    import torch

    return torch.cuda.is_available() and CUDA_HOME is not None


def _extension():
    with_cuda = _with_cuda()
    if os.name == "nt":
        cxx = ["/O2"]
    else:
        # -fno-trapping-math: lets GCC if-convert and vectorise the branch-free footprint loops
        # (the kernels never inspect floating-point exception flags; results are unchanged).
        cxx = ["-O3", "-fno-trapping-math", "-fvisibility=hidden"]
    macros = [("Py_LIMITED_API", "0x030A0000")]
    if with_cuda:
        macros.append(("STM_WITH_CUDA", None))
        if os.environ.get("FORCE_CUDA", "").strip() == "1":
            macros.append(("STM_FORCE_CUDA", None))
        nvcc = ["-O3"]
        print(f"stm_cuda_ops: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME})", file=sys.stderr)
        return CUDAExtension(
            "stm_cuda_ops._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=INCLUDE_DIRS,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            py_limited_api=True,
        )
    print("stm_cuda_ops: building CPU kernels only", file=sys.stderr)
    return CppExtension(
        "stm_cuda_ops._C",
        CPU_SOURCES,
        include_dirs=INCLUDE_DIRS,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        py_limited_api=True,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
