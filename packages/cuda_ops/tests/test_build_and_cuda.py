"""Build checks (what was compiled in), the fallback without the extension, and CUDA tests.

The CUDA tests need a GPU and are skipped without one (STM_REQUIRE_GPU=1, set by `nox -s gpu_check`,
makes them run, and fail, instead); the build checks run everywhere. The same CUDA kernels run on
the CPU in test_cuda_emulated.py."""

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

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("STM_REQUIRE_GPU") != "1",
                               reason="needs a CUDA device")


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
        assert "nox -s build_ops" in str(hits[0].message), str(hits[0].message)
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


@needs_gpu
@pytest.mark.cuda
def test_cuda_gradcheck_and_backward_opcheck(ops, make_inputs):
    value, shapes, starts, loc, attn = _cuda_inputs(make_inputs, torch.float64, N=2, Lq=3, M=2, D=3,
                                                    shapes=((3, 4), (2, 2)), P=2, smooth=True, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), (value, loc, attn), eps=1e-6, atol=1e-7
    )
    grad_out = torch.randn(2, 3, 6, dtype=torch.float64, device="cuda")
    torch.library.opcheck(ops.ms_deform_attn_backward,
                          (value.detach(), shapes, starts, loc.detach(), attn.detach(), grad_out, 64))


@needs_gpu
@pytest.mark.cuda
def test_cuda_nonfinite_locations_are_out_of_range(ops, make_inputs):
    value, shapes, starts, loc, attn = _cuda_inputs(make_inputs, torch.float32, N=1, Lq=3, M=2, D=8)
    loc = loc.clone()
    loc[0, 0] = float("nan")
    loc[0, 1] = float("inf")
    loc[0, 2] = -1e30
    got = _grads(ms_deform_attn, (value, shapes, starts, loc, attn), torch.ones(1, 3, 16, device="cuda"))
    for t in got:
        assert torch.isfinite(t).all() and not t.any()


@needs_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_agrees_with_its_cpu_emulation(ops, emulated, make_inputs, dtype):
    """The emulation that runs these kernels in the CPU test suite computes what the GPU computes
    (up to the GPU's fused multiply-adds and the order of its atomic additions)."""
    inputs = make_inputs(N=3, Lq=9, M=2, D=24, shapes=((7, 6), (3, 3)), P=4, dtype=dtype, seed=2)
    grad_out = torch.randn(3, 9, 48, dtype=dtype, generator=torch.Generator().manual_seed(3))
    cuda = _grads(ms_deform_attn, [t.cuda() for t in inputs], grad_out.cuda())
    out = emulated.ms_deform_attn_forward(*inputs, 64)
    emu = (out, *emulated.ms_deform_attn_backward(*inputs, grad_out, 64))
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}
    for name, c, e in zip(("output", "grad_value", "grad_loc", "grad_attn"), cuda, emu):
        torch.testing.assert_close(c.cpu(), e, **tol, msg=lambda m, n=name: f"{n}: {m}")


@needs_gpu
@pytest.mark.cuda
def test_cuda_indexing_beyond_2_31_elements(ops):
    """An output of more than 2^31 elements (N*Lq*M*D): 64-bit index arithmetic and the grid-stride
    loops (the grid is capped at 2^20 blocks of 256 threads). Checked on the last queries against
    the reference, and grad_value through an invariant: with every sample inside the map and
    grad_output = 1, grad_value sums to D * sum of the attention weights."""
    M, D, P = 1, 16, 1
    Lq = (1 << 31) // (M * D) + 1024  # N * Lq * M * D > 2^31
    H = W = 128
    need = Lq * M * D * 4 * 2 + Lq * P * 4 * 6 + (1 << 30)  # output + grad_output, locations/weights + grads
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"memory: needs about {need / 2**30:.1f} GiB of GPU memory, {free / 2**30:.1f} GiB free")
    g = torch.Generator(device="cuda").manual_seed(0)
    value = torch.randn(1, H * W, M, D, device="cuda", generator=g)
    shapes = torch.tensor([[H, W]], device="cuda")
    starts = torch.zeros(1, dtype=torch.long, device="cuda")
    loc = (torch.rand(1, Lq, M, 1, P, 2, device="cuda", generator=g) * (H - 2) + 1) / H  # 1 px inside the edges
    attn = torch.rand(1, Lq, M, 1, P, device="cuda", generator=g)
    out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.numel() > 2**31
    tail = slice(Lq - 256, Lq)
    want = ms_deform_attn_reference(value, shapes, starts, loc[:, tail], attn[:, tail])
    torch.testing.assert_close(out[:, tail], want, atol=1e-5, rtol=1e-5)
    grad_value, grad_loc, grad_attn = ops.ms_deform_attn_backward(value, shapes, starts, loc, attn,
                                                                  torch.ones_like(out), 64)
    del out
    leaves = [t.detach().clone().requires_grad_(True) for t in (loc[:, tail], attn[:, tail])]
    ref_tail = ms_deform_attn_reference(value, shapes, starts, leaves[0], leaves[1])
    want_loc, want_attn = torch.autograd.grad(ref_tail, leaves, torch.ones_like(ref_tail))
    torch.testing.assert_close(grad_loc[:, tail], want_loc, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grad_attn[:, tail], want_attn, atol=1e-4, rtol=1e-4)
    total = grad_value.double().sum().item()
    expected = D * attn.double().sum().item()
    assert abs(total - expected) <= 1e-4 * expected, (total, expected)
