"""The CUDA kernels, run on the CPU: csrc/cuda/ms_deform_attn_cuda.cu compiled unchanged as host C++
against the CUDA emulation in tests/emulation (fibers for the threads of a block, lockstep warp
shuffles, atomics, the driver's launch-configuration checks), launched through the same host code
as on a GPU (csrc/ms_deform_attn_validate.cpp: validation; csrc/cuda/ms_deform_attn_cuda_launch.cpp:
float32 accumulation buffers, dtype dispatch; the .cu's grid/block sizing and lane groups).

Tested like the CPU kernel: against the float64 reference (forward and all three gradients), the
spec formula, gradcheck, a fuzz, odd sizes and reduced precision. `pytest -k emulated` selects
these tests. What the emulation cannot show (timing, races between blocks, FMA contraction, ...)
is listed in tests/emulation/include/stm_cuda_emulation.h; `nox -s gpu_check` covers it on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from msda_fuzz import fuzz_op_shapes

import stm_cuda_ops
from stm_cuda_ops import ms_deform_attn_reference

F64 = {"atol": 1e-12, "rtol": 1e-10}
CSRC = Path(stm_cuda_ops.__file__).resolve().parent / "csrc"


def _run(ops, inputs, grad_out=None, seed=1):
    """Output and the three gradients from the emulated CUDA forward and backward kernels."""
    value, shapes, starts, loc, attn = inputs
    out = ops.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return (out, *ops.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out, 64)), grad_out


def _reference(inputs, grad_out):
    """float64 reference (grid_sample + autograd)."""
    value, shapes, starts, loc, attn = (t.double() if t.is_floating_point() else t for t in inputs)
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.double()))


NAMES = ("output", "grad_value", "grad_loc", "grad_attn")


def _assert_all_close(got, want, **tol):
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m, n=name: f"{n}: {m}")


# Odd sizes: D not a power of two, D > 32, D not dividing 32, heads straddling warps, one-channel
# heads, a batch above the original im2col_step of 128, several levels.
CASES = {
    "D16_levels3": dict(N=2, Lq=13, M=3, D=16, shapes=((9, 8), (5, 4), (2, 3)), P=4),
    "D24_lane_groups_of_8": dict(N=2, Lq=9, M=2, D=24, shapes=((7, 7),), P=5),
    "D5_no_shuffle": dict(N=1, Lq=20, M=4, D=5, shapes=((6, 5), (3, 3)), P=3),
    "D48_head_straddles_warps": dict(N=1, Lq=7, M=2, D=48, shapes=((5, 6),), P=3),
    "D64_two_warps_per_head": dict(N=1, Lq=6, M=1, D=64, shapes=((8, 8),), P=2),
    "D1": dict(N=2, Lq=5, M=3, D=1, shapes=((4, 5), (2, 2)), P=3),
    "D33": dict(N=1, Lq=4, M=2, D=33, shapes=((3, 4),), P=2),
    "batch130": dict(N=130, Lq=2, M=2, D=8, shapes=((4, 4),), P=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_emulated_matches_reference_float64(emulated, make_inputs, case):
    inputs = make_inputs(**CASES[case], spread=0.2, seed=3)
    got, grad_out = _run(emulated, inputs)
    _assert_all_close(got, _reference(inputs, grad_out), **F64)


def test_emulated_matches_spec_formula(emulated, make_inputs, naive):
    inputs = make_inputs(N=2, Lq=3, M=2, D=3, shapes=((3, 4), (2, 2)), P=2, spread=0.3)
    (out, *_), _ = _run(emulated, inputs)
    torch.testing.assert_close(out, naive(*inputs), **F64)


def test_emulated_uses_warp_shuffles_and_atomics(emulated, make_inputs):
    """The reductions really go through the warp shuffles when a head spans several lanes, and not
    at all for D = 5 (lane groups of one); grad_value through atomics."""
    emulated.stats(True)
    _run(emulated, make_inputs(N=1, Lq=3, M=2, D=16, shapes=((4, 4),), P=2))
    launches, blocks, threads, collectives, _, atomics, grid, block = emulated.stats(True)
    assert launches == 2 and block == 256 and grid == 1 and threads == 2 * 256
    # 256 threads = 8 warps, each reaches 3 shuffles x log2(16) rounds for each of the L*P = 2
    # samples of each of its iterations (one iteration: 96 elements < 256 threads).
    assert collectives == 8 * 2 * 3 * 4
    assert atomics > 0
    _run(emulated, make_inputs(N=1, Lq=3, M=2, D=5, shapes=((4, 4),), P=2))
    assert emulated.stats(True)[3] == 0


def test_emulated_grid_stride_loop(emulated, make_inputs):
    """More elements than threads: with the grid capped at 2 blocks (512 threads), each thread
    walks the grid-stride loop several times, the last time partly past the end."""
    inputs = make_inputs(N=3, Lq=11, M=2, D=12, shapes=((5, 4), (2, 3)), P=3, seed=5)
    total = 3 * 11 * 2 * 12
    assert total > 512 and total % 256 != 0
    try:
        emulated.configure(0, 2)
        emulated.stats(True)
        got, grad_out = _run(emulated, inputs)
        stats = emulated.stats(True)
    finally:
        emulated.configure(0, 1 << 20)
    assert stats[6] == 2 and stats[1] == 2 * 2  # grid.x of the last launch; blocks of both launches
    _assert_all_close(got, _reference(inputs, grad_out), **F64)


def test_emulated_block_and_lane_order(emulated, make_inputs):
    """A GPU runs blocks and lanes in no fixed order: a shuffled schedule gives the same forward
    bit for bit and gradients equal up to the summation order of the atomics."""
    inputs = make_inputs(N=2, Lq=10, M=2, D=16, shapes=((6, 5),), P=4, seed=7)
    in_order, grad_out = _run(emulated, inputs)
    try:
        emulated.configure(12345, 3)
        shuffled, _ = _run(emulated, inputs, grad_out)
    finally:
        emulated.configure(0, 1 << 20)
    assert torch.equal(shuffled[0], in_order[0])
    _assert_all_close(shuffled, in_order, **F64)


@pytest.mark.parametrize("D", [16, 7])
def test_emulated_float32(emulated, ops, make_inputs, D):
    inputs = make_inputs(N=2, Lq=6, M=3, D=D, shapes=((9, 8), (5, 4)), P=5, dtype=torch.float32, seed=D)
    got, grad_out = _run(emulated, inputs)
    assert all(t.dtype == torch.float32 for t in got)
    # float32: errors of a few ulps of the largest terms of each sum.
    _assert_all_close(got, _reference(inputs, grad_out), atol=1e-5, rtol=1e-4)
    # ... and the CPU kernel on the same float32 inputs agrees at the same level.
    leaves = [t.detach().clone().requires_grad_(True) for t in (inputs[0], inputs[3], inputs[4])]
    cpu_out = stm_cuda_ops.ms_deform_attn(leaves[0], inputs[1], inputs[2], leaves[1], leaves[2])
    cpu = (cpu_out, *torch.autograd.grad(cpu_out, leaves, grad_out))
    for name, g, c in zip(NAMES, got, cpu):
        torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_reduced_precision(emulated, make_inputs, dtype):
    """float16/bfloat16: native loads and stores with float32 arithmetic and float32 gradient
    buffers. Hence exactly the float32 kernel on the rounded inputs, rounded once at the end (this
    checks the conversions both ways), and close to the float64 reference."""
    inputs = make_inputs(N=2, Lq=6, M=2, D=16, shapes=((7, 6), (3, 3)), P=4, dtype=dtype, smooth=True, seed=11)
    got, grad_out = _run(emulated, inputs)
    assert all(t.dtype == dtype for t in got)
    up = [t.float() if t.is_floating_point() else t for t in inputs]
    want32, _ = _run(emulated, up, grad_out.float())
    for name, g, w in zip(NAMES, got, want32):
        assert torch.equal(g, w.to(dtype)), name
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    for name, g, w in zip(NAMES, got, _reference(inputs, grad_out)):
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g.double(), w, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")


class _EmulatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ops, value, shapes, starts, loc, attn):
        ctx.ops = ops
        ctx.save_for_backward(value, shapes, starts, loc, attn)
        return ops.ms_deform_attn_forward(value, shapes, starts, loc, attn, 64)

    @staticmethod
    def backward(ctx, grad_out):
        value, shapes, starts, loc, attn = ctx.saved_tensors
        gv, gl, ga = ctx.ops.ms_deform_attn_backward(value, shapes, starts, loc, attn, grad_out.contiguous(), 64)
        return None, gv, None, None, gl, ga


def test_emulated_gradcheck(emulated, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=3, shapes=((3, 4), (2, 2)), P=2,
                                                   smooth=True, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda v, lo, a: _EmulatedFn.apply(emulated, v, shapes, starts, lo, a), (value, loc, attn),
        eps=1e-6, atol=1e-7,
    )


def test_emulated_out_of_range_and_nonfinite(emulated, make_inputs):
    """Strict range test, and NaN/inf/huge locations out of range (zero output and gradients), as
    in the CPU kernel and the reference."""
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=5, M=2, D=4, shapes=((4, 4),), P=2)
    loc = loc.clone()
    loc[0, 0] = float("nan")
    loc[0, 1] = float("inf")
    loc[0, 2] = -float("inf")
    loc[0, 3] = -1e30
    loc[0, 4, :, :, :, 0] = -0.5 / 4  # X = -1 exactly: out of range (strict)
    inputs = (value, shapes, starts, loc, attn)
    got, grad_out = _run(emulated, inputs)
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all() and not t.any(), name
    # The reference agrees for the non-finite rows (at X = -1 exactly grid_sample still gives a
    # location gradient: a measure-zero boundary, deformable_op.md section 3).
    want = _reference(inputs, grad_out)
    for name, w in zip(NAMES[:1] + NAMES[2:], want[:1] + want[2:]):
        assert not w[:, :4].any(), name
    assert not want[1].any()  # grad_value


def test_emulated_validation_and_empty(emulated, make_inputs):
    """The validation is the one the CUDA ops run (ms_deform_attn_validate.cpp); empty batches launch nothing."""
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=4, shapes=((4, 5), (3, 2)), P=2)
    with pytest.raises(RuntimeError, match=r"sum of H\*W over levels is 26 but value has S = 27"):
        emulated.ms_deform_attn_forward(torch.cat([value, value[:, :1]], 1), shapes, starts, loc, attn, 64)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(N, Lq, M\*D\)"):
        emulated.ms_deform_attn_backward(value, shapes, starts, loc, attn, torch.zeros(2, 3, 7, dtype=value.dtype), 64)
    emulated.stats(True)
    got, _ = _run(emulated, (value[:0], shapes, starts, loc[:0], attn[:0]))
    assert got[0].shape == (0, 3, 8) and got[1].shape == (0, 26, 2, 4)
    assert emulated.stats(True)[0] == 0  # no kernel launch


@pytest.mark.parametrize("name", ["xor_sum", "down_sum", "reverse_in_block"])
def test_emulated_harness_runs_known_kernels(emulated, name):
    """The emulation itself: shuffle reductions and a __syncthreads exchange with known results."""
    assert emulated.selftest(name) == "ok"


@pytest.mark.parametrize("name,message", [
    ("early_exit", r"lane 3\) .* exited while .* waits for it in a warp shuffle"),
    ("diverged", r"lane 16\) .* waits in a different warp-synchronous call"),
    ("bad_config", r"invalid configuration argument .*block \(2048,1,1\)"),
])
def test_emulated_harness_reports_broken_kernels(emulated, name, message):
    """Kernels that break the warp-synchronous rules (a hang or garbage on a GPU) or the launch
    limits are reported as launch errors naming the lanes, not run."""
    import re

    assert re.search(message, emulated.selftest(name)), emulated.selftest(name)


def test_kernels_share_bilinear_header():
    """The CPU and CUDA kernels take the footprint, weights, bounds and per-sample gradients from
    one header (so the CPU tests exercise the GPU's arithmetic); neither keeps a private copy."""
    cu = (CSRC / "cuda" / "ms_deform_attn_cuda.cu").read_text()
    cpu = (CSRC / "cpu" / "cpu_kernel_impl.h").read_text()
    for text in (cu, cpu):
        assert '#include "bilinear.h"' in text
        for fn in ("footprint", "corner_weights", "corners", "sample_grads"):
            assert f"bilinear::{fn}<" in text, fn
        assert "floor(" not in text and "- static_cast<T>(0.5)" not in text and "- static_cast<A>(0.5)" not in text


@fuzz_op_shapes(max_examples=15, max_queries=5, head_dims=[1, 2, 3, 8, 16, 17, 32, 40])
def test_emulated_fuzz_against_reference(emulated, make_inputs, N, Lq, M, D, levels, P, spread, seed):
    inputs = make_inputs(N, Lq, M, D, tuple(levels), P, spread=spread, seed=seed)
    got, grad_out = _run(emulated, inputs, seed=seed)
    _assert_all_close(got, _reference(inputs, grad_out), **F64)
