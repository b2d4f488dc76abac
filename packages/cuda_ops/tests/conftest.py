"""Shared fixtures of the stm_cuda_ops tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import stm_cuda_ops

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # for msda_fuzz
    sys.path.insert(0, TESTS_DIR)

ALLOW_NO_EXT = os.environ.get("STM_ALLOW_NO_EXT") == "1"


@pytest.fixture
def ops():
    """torch.ops.stm_cuda_ops, for tests of the compiled op.

    A missing extension makes these tests FAIL (a silent fallback to the reference would make the
    whole file pass without testing anything), unless STM_ALLOW_NO_EXT=1 turns that into a skip.
    """
    if not stm_cuda_ops.has_compiled_op():
        msg = f"stm_cuda_ops compiled extension not loaded: {stm_cuda_ops.build_info().get('error')}"
        if ALLOW_NO_EXT:
            pytest.skip(msg + " (STM_ALLOW_NO_EXT=1)")
        pytest.fail(msg + f" -- build it with `{stm_cuda_ops.BUILD_COMMAND}` or set STM_ALLOW_NO_EXT=1")
    return torch.ops.stm_cuda_ops


@pytest.fixture(params=["default", "avx2", "avx512"])
def cpu_isa(request, ops):
    """Runs a test once per CPU kernel set available on this machine, then restores the default."""
    available = str(stm_cuda_ops.build_info()["cpu_isas"]).split(",")
    if request.param not in available:
        pytest.skip(f"CPU kernel set {request.param} not available here ({available})")
    ops._cpu_isa(request.param)
    yield request.param
    ops._cpu_isa("auto")


EMULATION_DIR = Path(__file__).resolve().parent / "emulation"
CSRC_DIR = Path(__file__).resolve().parents[1] / "stm_cuda_ops" / "csrc"
# Read at collection time: some test directories point STM_CACHE at a temporary folder while they run,
# which would make every session rebuild the emulation.
EMULATION_CACHE = Path(os.environ.get("STM_CACHE", Path.home() / ".cache" / "stm")).expanduser() / "torch_extensions"


def build_emulated_ops():
    """Compile csrc/cuda/ms_deform_attn_cuda.cu as host C++ against the CUDA emulation (tests/emulation),
    with the host code that launches it on a GPU (csrc/ms_deform_attn_validate.cpp,
    csrc/cuda/ms_deform_attn_cuda_launch.cpp), and load it as torch.ops.stm_cuda_ops_emulated.

    A separate library, built here and never by setup.py, so the normal build is unchanged. Cached
    under ${STM_CACHE:-~/.cache/stm}/torch_extensions (outside the clone); ninja's dependency files
    rebuild it when the kernels, the shared headers or the emulation change, and the directory name
    carries the torch version and the Python ABI.
    """
    if hasattr(torch.ops, "stm_cuda_ops_emulated") and hasattr(torch.ops.stm_cuda_ops_emulated, "selftest"):
        return torch.ops.stm_cuda_ops_emulated
    from torch.utils import cpp_extension

    build_dir = EMULATION_CACHE / f"stm_cuda_ops_emulated-torch{torch.__version__}-{sys.implementation.cache_tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="stm_cuda_ops_emulated",
        sources=[str(EMULATION_DIR / "emulated_op.cpp"), str(EMULATION_DIR / "emulated_kernels.cpp"),
                 str(CSRC_DIR / "ms_deform_attn_validate.cpp"), str(CSRC_DIR / "cuda" / "ms_deform_attn_cuda_launch.cpp")],
        extra_include_paths=[str(EMULATION_DIR / "include"), str(CSRC_DIR)],
        extra_cflags=["-O2", "-ffp-contract=off", "-DSTM_CUDA_EMULATION", "-fvisibility=hidden"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.stm_cuda_ops_emulated


@pytest.fixture(scope="session")
def emulated():
    """torch.ops.stm_cuda_ops_emulated: the CUDA kernels run on the CPU (see tests/emulation).

    Needs only a C++ compiler (the one that builds the extension); a failed build fails the tests.
    """
    ops = build_emulated_ops()
    ops.configure(0, 1 << 20)
    yield ops
    ops.configure(0, 1 << 20)


def level_index(spatial_shapes: torch.Tensor) -> torch.Tensor:
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def _make_inputs(N=2, Lq=5, M=2, D=4, shapes=((4, 5), (3, 2), (1, 1)), P=3, *, dtype=torch.float64,
                 device="cpu", spread=0.2, smooth=False, seed=0, requires_grad=False):
    """Random op inputs. Locations are uniform in [-spread, 1 + spread] (so some samples fall
    outside the map), or with smooth=True placed away from pixel-centre lines and from the range
    boundary (where the op is not differentiable), as gradcheck needs."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    L = len(shapes)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    if smooth:
        hw = spatial_shapes.to(torch.float64)  # (L, 2) rows (H, W)
        size = torch.stack([hw[:, 1], hw[:, 0]], -1)[:, None, :]  # (L, 1, 2) as (W, H)
        cell = torch.floor(torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (size + 1)) - 1
        frac = 0.15 + 0.7 * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64)
        loc = (cell + frac + 0.5) / size
    else:
        loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (1 + 2 * spread) - spread
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    value, loc, attn = (t.to(device=device, dtype=dtype) for t in (value, loc, attn))
    if requires_grad:
        for t in (value, loc, attn):
            t.requires_grad_(True)
    spatial_shapes = spatial_shapes.to(device)
    return value, spatial_shapes, level_index(spatial_shapes), loc, attn


@pytest.fixture
def make_inputs():
    return _make_inputs


def _naive(value, spatial_shapes, level_start_index, loc, attn):
    """The spec formula, literally, with Python loops (tiny inputs only)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    out = torch.zeros(N, Lq, M * D, dtype=value.dtype)
    zero = torch.zeros(D, dtype=value.dtype)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                acc = torch.zeros(D, dtype=value.dtype)
                for lvl in range(L):
                    H, W = (int(x) for x in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])

                    def V(y, x, n=n, m=m, H=H, W=W, start=start):
                        if 0 <= y < H and 0 <= x < W:
                            return value[n, start + y * W + x, m]
                        return zero

                    for p in range(P):
                        X = float(loc[n, q, m, lvl, p, 0]) * W - 0.5
                        Y = float(loc[n, q, m, lvl, p, 1]) * H - 0.5
                        if not (-1 < Y < H and -1 < X < W):
                            continue
                        y0, x0 = int(torch.floor(torch.tensor(Y))), int(torch.floor(torch.tensor(X)))
                        ly, lx = Y - y0, X - x0
                        hy, hx = 1 - ly, 1 - lx
                        sample = (hy * hx * V(y0, x0) + hy * lx * V(y0, x0 + 1) + ly * hx * V(y0 + 1, x0)
                                  + ly * lx * V(y0 + 1, x0 + 1))
                        acc = acc + attn[n, q, m, lvl, p] * sample
                out[n, q, m * D:(m + 1) * D] = acc
    return out


@pytest.fixture
def naive():
    return _naive
