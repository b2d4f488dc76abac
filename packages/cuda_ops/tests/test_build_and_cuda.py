"""Build checks (what was compiled in), the fallback without the extension, and CUDA tests.

The CUDA tests need a GPU and are skipped without one; the build checks run everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import stm_cuda_ops
from stm_cuda_ops import ms_deform_attn, ms_deform_attn_reference

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_build_info(ops):
    info = stm_cuda_ops.build_info()
    assert info["extension_loaded"] is True and info["cpu_kernels"] is True
    assert info["torch"] == torch.__version__
    assert info["cpu_isa"] in str(info["cpu_isas"]).split(",")
    assert stm_cuda_ops.has_compiled_op()


def test_cuda_kernels_compiled_in_when_forced(ops):
    """A build with FORCE_CUDA=1 must contain the CUDA kernels (checked without a GPU)."""
    info = stm_cuda_ops.build_info()
    if not (os.environ.get("FORCE_CUDA") == "1" or info["force_cuda"] or torch.cuda.is_available()):
        pytest.skip("built without FORCE_CUDA=1 and no GPU here")
    assert info["cuda_kernels"] is True, info
    for name in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_cuda_ops::{name}", "CUDA")
    assert re.fullmatch(r"\d+\.\d+", str(info["cuda_version"])), info
    assert re.fullmatch(r"\d+(,\d+)*", str(info["cuda_archs"])), info


def test_fallback_without_extension():
    """Without the compiled library, import works and ms_deform_attn warns once and uses the reference."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["stm_cuda_ops._C"] = None  # makes `from . import _C` raise ImportError
        import torch, stm_cuda_ops
        assert not stm_cuda_ops.has_compiled_op()
        info = stm_cuda_ops.build_info()
        assert info["extension_loaded"] is False and "stm_cuda_ops._C" in info["error"], info
        shapes = torch.tensor([[3, 4]]); starts = torch.tensor([0])
        v = torch.randn(2, 12, 2, 4); loc = torch.rand(2, 5, 2, 1, 3, 2); a = torch.rand(2, 5, 2, 1, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = stm_cuda_ops.ms_deform_attn(v, shapes, starts, loc, a)
            stm_cuda_ops.ms_deform_attn(v, shapes, starts, loc, a)
        hits = [w for w in caught if "falls back" in str(w.message)]
        assert len(hits) == 1, [str(w.message) for w in caught]
        assert torch.equal(out, stm_cuda_ops.ms_deform_attn_reference(v, shapes, starts, loc, a))
        print("fallback ok")
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------------
# CUDA (run on a GPU machine)


def _cuda_inputs(make_inputs, dtype, **kw):
    return make_inputs(**kw, dtype=dtype, device="cuda")


def _grads(fn, inputs, grad_out):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, grad_out.to(out)))


def _oracle(inputs, grad_out):
    """float64 reference on the CPU."""
    cpu = [t.detach().cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]
    return _grads(ms_deform_attn_reference, cpu, grad_out.cpu().double())


CUDA_SHAPES = [
    dict(N=2, Lq=37, M=3, D=16, shapes=((9, 8), (5, 4), (2, 3)), P=4),  # D a power of two <= 32
    dict(N=3, Lq=20, M=2, D=24, shapes=((7, 7),), P=9),  # channel groups of 8 lanes, atomics
    dict(N=1, Lq=50, M=4, D=5, shapes=((6, 5), (3, 3)), P=3),  # odd D
    dict(N=2, Lq=17, M=1, D=64, shapes=((8, 8),), P=2),  # a head spans two warps
    dict(N=130, Lq=3, M=2, D=8, shapes=((4, 4),), P=2),  # batch above im2col_step
]


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("shape", range(len(CUDA_SHAPES)))
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float64, 1e-10), (torch.float32, 2e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)],
)
def test_cuda_matches_reference(ops, make_inputs, shape, dtype, tol):
    # Reduced precision: locations away from pixel lines and the range boundary, where rounding the
    # inputs could move a sample across a discontinuity of the location gradient.
    reduced = dtype in (torch.float16, torch.bfloat16)
    inputs = _cuda_inputs(make_inputs, dtype, smooth=reduced, **CUDA_SHAPES[shape])
    value, _, _, loc, _ = inputs
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device="cuda")
    got = _grads(ms_deform_attn, inputs, grad_out)
    want = _oracle(inputs, grad_out)
    for name, g, w in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want):
        assert g.dtype == dtype and g.is_cuda, name
        # Tolerance relative to the magnitude of the quantity (reduced precision inputs).
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double().cpu(), w, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


@needs_gpu
@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_float32(ops, make_inputs):
    inputs = make_inputs(N=4, Lq=64, M=4, D=16, shapes=((16, 16),), P=9, dtype=torch.float32)
    cuda_inputs = [t.cuda() for t in inputs]
    torch.testing.assert_close(ms_deform_attn(*cuda_inputs).cpu(), ms_deform_attn(*inputs), atol=1e-5, rtol=1e-5)


@needs_gpu
@pytest.mark.cuda
def test_cuda_autocast_compile_and_errors(ops, make_inputs):
    value, shapes, starts, loc, attn = _cuda_inputs(make_inputs, torch.float32, N=2, Lq=6, M=2, D=8)
    with torch.autocast("cuda", dtype=torch.float16):
        out = ms_deform_attn(value.half(), shapes, starts, loc.half(), attn)
    assert out.dtype == torch.float32
    compiled = torch.compile(lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), fullgraph=True)
    torch.testing.assert_close(compiled(value, loc, attn), ms_deform_attn(value, shapes, starts, loc, attn))
    torch.library.opcheck(ops.ms_deform_attn_forward, (value, shapes, starts, loc, attn, 64))
    with pytest.raises(RuntimeError, match="must be on the same device"):
        ms_deform_attn(value, shapes.cpu(), starts, loc, attn)
    with pytest.raises(RuntimeError, match="sum of H"):
        ms_deform_attn(torch.cat([value, value[:, :1]], 1), shapes, starts, loc, attn)
    empty = ms_deform_attn(value[:0], shapes, starts, loc[:0], attn[:0])
    assert empty.shape == (0, 6, 16) and empty.is_cuda
