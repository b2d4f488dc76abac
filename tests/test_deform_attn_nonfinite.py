"""NaN/inf sampling locations give the same result whichever implementation of the deformable op runs:
the compiled kernels or stm_cuda_ops' pure-PyTorch reference (the one fallback), called directly or through
stm_backbones' op wrapper. All treat them as out of range: zero contribution and zero gradient."""

from __future__ import annotations

import pytest
import torch

import stm_cuda_ops
from stm_backbones import ops


def _inputs():
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[4, 5], [2, 3]])
    starts = torch.tensor([0, 20])
    value = torch.randn(2, 26, 2, 4, generator=g, dtype=torch.float64)
    loc = torch.rand(2, 3, 2, 2, 3, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1
    attn = torch.rand(2, 3, 2, 2, 3, generator=g, dtype=torch.float64)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 2, 1] = float("inf")
    loc[1, 2, 0, 0, 1] = -float("inf")
    return value, shapes, starts, loc, attn


def _grads(fn, value, shapes, starts, loc, attn):
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))


@pytest.mark.parametrize("name", ["compiled", "backbones_compiled", "backbones_reference"])
def test_nonfinite_locations_agree_across_implementations(name):
    value, shapes, starts, loc, attn = _inputs()
    want = _grads(stm_cuda_ops.ms_deform_attn_reference, value, shapes, starts, loc, attn)
    if "compiled" in name and not stm_cuda_ops.has_compiled_op():
        pytest.skip("stm_cuda_ops extension not built")
    fn = stm_cuda_ops.ms_deform_attn if name == "compiled" else ops.ms_deform_attn
    with stm_cuda_ops.use_reference(name.endswith("reference")):
        got = _grads(fn, value, shapes, starts, loc, attn)
    bad = ~torch.isfinite(loc).all(-1)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)
    assert not got[2][bad].any() and not got[3][bad].any()


def test_numpy_input_to_the_backbones_op_is_a_type_error():
    value, shapes, starts, loc, attn = _inputs()
    with pytest.raises(TypeError, match=r"sampling_locations must be a torch.Tensor, got numpy.ndarray"):
        ops.ms_deform_attn(value, shapes, starts, loc.numpy(), attn)
