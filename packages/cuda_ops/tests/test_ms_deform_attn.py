"""Tests of stm_cuda_ops.ms_deform_attn: CPU kernels against the grid_sample reference (and the
reference against the literal spec formula), gradients, dispatcher integration (torch.compile,
opcheck, autocast), input validation and a hypothesis fuzz over shapes."""

from __future__ import annotations

import warnings

import pytest
import torch
from msda_fuzz import fuzz_op_shapes

import stm_cuda_ops
from stm_cuda_ops import ms_deform_attn, ms_deform_attn_reference

F64 = {"atol": 1e-12, "rtol": 1e-10}


def grads(fn, inputs, grad_out=None, seed=1):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grad_out = grad_out.to(out)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def assert_matches_reference(inputs, **tol):
    tol = tol or F64
    got = grads(ms_deform_attn, inputs)
    want = grads(ms_deform_attn_reference, inputs)
    for name, g, w in zip(("output", "grad_value", "grad_loc", "grad_attn"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# The oracle itself


def test_reference_matches_spec_formula(make_inputs, naive):
    inputs = make_inputs(N=2, Lq=3, M=2, D=3, shapes=((3, 4), (2, 2)), P=2, spread=0.3)
    torch.testing.assert_close(ms_deform_attn_reference(*inputs), naive(*inputs), **F64)


def test_compiled_matches_spec_formula(ops, make_inputs, naive):
    inputs = make_inputs(N=2, Lq=3, M=2, D=3, shapes=((3, 4), (2, 2)), P=2, spread=0.3)
    torch.testing.assert_close(ms_deform_attn(*inputs), naive(*inputs), **F64)


# ------------------------------------------------------------------------------------------------
# Forward and gradients vs the reference


@pytest.mark.parametrize("D", [1, 4, 5, 8, 16, 32, 64])
def test_forward_backward_float64(ops, cpu_isa, make_inputs, D):
    assert_matches_reference(make_inputs(N=2, Lq=7, M=3, D=D, P=4))


def test_multi_level(ops, make_inputs):
    inputs = make_inputs(N=2, Lq=9, M=2, D=8, shapes=((7, 6), (4, 3), (2, 2)), P=4, spread=0.1)
    assert_matches_reference(inputs)


@pytest.mark.parametrize("D", [16, 7])
def test_float32(ops, cpu_isa, make_inputs, D):
    inputs = make_inputs(N=2, Lq=11, M=4, D=D, shapes=((9, 8), (5, 4)), P=9, dtype=torch.float32)
    assert_matches_reference(inputs, atol=1e-5, rtol=1e-4)


def test_gradcheck(ops, make_inputs):
    inputs = make_inputs(N=2, Lq=3, M=2, D=3, shapes=((3, 4), (2, 2)), P=2, smooth=True, requires_grad=True)
    value, shapes, starts, loc, attn = inputs
    assert torch.autograd.gradcheck(
        lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), (value, loc, attn), eps=1e-6, atol=1e-7
    )


def test_points_outside_map(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=6, M=2, D=4, shapes=((5, 4), (3, 3)), P=4, spread=0.0)
    far = torch.tensor([[-0.7, 0.5], [1.8, 0.5], [0.5, -3.0], [0.5, 1.6]], dtype=loc.dtype)
    loc = loc.clone()
    loc[:, :, :, :, :] = far[None, None, None, None]  # every sample far outside the map
    loc[0, 0, 0, 0, 0] = torch.tensor([0.4, 0.6])  # except one
    out, g_value, g_loc, g_attn = grads(ms_deform_attn, (value, shapes, starts, loc, attn))
    # Only the one in-range sample contributes; everything else is exactly zero.
    assert out[1].abs().max() == 0 and out[0, 1:].abs().max() == 0 and out[0, 0, 4:].abs().max() == 0
    assert out[0, 0, :4].abs().min() > 0
    mask = torch.zeros_like(g_attn, dtype=torch.bool)
    mask[0, 0, 0, 0, 0] = True
    assert g_attn[~mask].abs().max() == 0 and g_attn[mask].abs().min() > 0
    assert g_loc[~mask].abs().max() == 0
    assert (g_value != 0).any(-1).sum() <= 4  # the four corner pixels of the in-range sample
    assert_matches_reference((value, shapes, starts, loc, attn))


def test_range_boundary_is_strict(ops):
    """X = -1 or X = W (Y likewise) is out of range: zero output and zero gradients; inside it
    the zero-padded bilinear interpolation applies."""
    W = H = 4
    value = torch.ones(1, H * W, 1, 2, dtype=torch.float64)
    shapes = torch.tensor([[H, W]])
    starts = torch.zeros(1, dtype=torch.long)
    # lx = (X + 0.5) / W: X = -1, W, -0.5 (half in), 1.5 (inside)
    xs = torch.tensor([-0.5 / W, (W + 0.5) / W, 0.0, 2.0 / W], dtype=torch.float64)
    loc = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, 4, 1, 1, 1, 2)
    attn = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out, _, g_loc, g_attn = grads(ms_deform_attn, (value, shapes, starts, loc, attn))
    torch.testing.assert_close(out[0, :, 0], torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert g_loc[0, :2].abs().max() == 0 and g_attn[0, :2].abs().max() == 0


@pytest.mark.parametrize("N", [1, 3, 130])
def test_batch_sizes(ops, make_inputs, N):
    inputs = make_inputs(N=N, Lq=4, M=2, D=4, shapes=((4, 4), (2, 2)), P=2, dtype=torch.float32)
    value, shapes, starts, loc, attn = inputs
    want = ms_deform_attn_reference(*inputs)
    for step in (64, 1, 7):
        torch.testing.assert_close(ms_deform_attn(*inputs, im2col_step=step), want, atol=1e-5, rtol=1e-5)
    assert_matches_reference(inputs, atol=1e-5, rtol=1e-4)


def test_im2col_step_has_no_effect(ops, make_inputs):
    inputs = make_inputs(N=5, Lq=6, M=2, D=4)
    outs = [ms_deform_attn(*inputs, im2col_step=s) for s in (1, 2, 3, 64, 128)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_threads_and_query_split(ops, make_inputs):
    """Fewer batch items than threads: the backward splits queries over private grad_value copies."""
    inputs = make_inputs(N=1, Lq=300, M=2, D=8, shapes=((6, 7),), P=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_matches_reference(inputs)
    finally:
        torch.set_num_threads(previous)


def test_non_contiguous_inputs(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=5, M=3, D=4)
    v_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    l_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    a_nc = torch.stack([attn, attn], -1)[..., 0]
    assert not (v_nc.is_contiguous() or l_nc.is_contiguous() or a_nc.is_contiguous())
    torch.testing.assert_close(ms_deform_attn(v_nc, shapes, starts, l_nc, a_nc),
                               ms_deform_attn(value, shapes, starts, loc, attn), **F64)
    assert_matches_reference((v_nc, shapes, starts, l_nc, a_nc))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs(ops, make_inputs, dtype):
    """float16/bfloat16 inputs on the CPU: computed in float32, returned in the input dtype."""
    inputs = make_inputs(N=2, Lq=5, M=2, D=8, dtype=dtype)
    out = ms_deform_attn(*inputs)
    assert out.dtype == dtype
    up = [t.float() if t.is_floating_point() else t for t in inputs]
    torch.testing.assert_close(out, ms_deform_attn(*up).to(dtype))
    _, g_value, g_loc, g_attn = grads(ms_deform_attn, inputs)
    assert g_value.dtype == g_loc.dtype == g_attn.dtype == dtype


def test_empty_batch_and_queries(ops, make_inputs):
    for N, Lq in ((0, 5), (2, 0)):
        inputs = make_inputs(N=N, Lq=Lq, M=2, D=4, requires_grad=True)
        out = ms_deform_attn(*inputs)
        assert out.shape == (N, Lq, 8)
        out.sum().backward()
        value, _, _, loc, attn = inputs
        assert value.grad.shape == value.shape and not value.grad.any()
        assert loc.grad.shape == loc.shape and attn.grad.shape == attn.shape


def test_zero_points(ops, make_inputs):
    inputs = make_inputs(N=2, Lq=3, P=0)
    assert torch.equal(ms_deform_attn(*inputs), torch.zeros(2, 3, 8, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Dispatcher integration


def test_registered_with_dispatcher(ops):
    for name in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
        keys = ["CPU", "Meta", "AutocastCPU", "AutocastCUDA"] + (["Autograd"] if name.endswith("forward") else [])
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_cuda_ops::{name}", key), (name, key)


def test_opcheck(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=4, M=2, D=4, shapes=((4, 5), (2, 2)), P=2,
                                                   requires_grad=True)
    torch.library.opcheck(ops.ms_deform_attn_forward, (value, shapes, starts, loc, attn, 64))
    grad_out = torch.randn(2, 4, 8, dtype=torch.float64)
    torch.library.opcheck(ops.ms_deform_attn_backward,
                          (value.detach(), shapes, starts, loc.detach(), attn.detach(), grad_out, 64))


def test_torch_compile_fullgraph(ops, make_inputs):
    torch._dynamo.reset()
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=6, M=2, D=4, dtype=torch.float32, requires_grad=True)
    proj = torch.randn(8, 8)

    def block(v, lo, a):
        return (ms_deform_attn(v, shapes, starts, lo, a.softmax(-1)) @ proj).tanh()

    compiled = torch.compile(block, fullgraph=True)
    got = compiled(value, loc, attn)
    got_grads = torch.autograd.grad(got.square().sum(), (value, loc, attn))
    want = block(value, loc, attn)
    want_grads = torch.autograd.grad(want.square().sum(), (value, loc, attn))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_torch_export(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=6, M=2, D=4, dtype=torch.float32)

    class Attn(torch.nn.Module):
        def forward(self, v, s, i, lo, a):
            return ms_deform_attn(v, s, i, lo, a)

    ep = torch.export.export(Attn(), (value, shapes, starts, loc, attn))
    assert "stm_cuda_ops.ms_deform_attn_forward" in str(ep.graph)
    torch.testing.assert_close(ep.module()(value, shapes, starts, loc, attn), ms_deform_attn(value, shapes, starts, loc, attn))


def test_autocast_bf16_runs_in_float32(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=8, M=2, D=8, dtype=torch.float32)
    reference32 = ms_deform_attn(value, shapes, starts, loc, attn)
    bf = [t.to(torch.bfloat16).requires_grad_(True) for t in (value, loc, attn)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(bf[0], shapes, starts, bf[1], bf[2])
        mixed = ms_deform_attn(bf[0], shapes, starts, loc, attn)  # mixed dtypes are fine under autocast
    assert out.dtype == torch.float32 and mixed.dtype == torch.float32
    # Exactly the float32 computation on the bf16-rounded inputs ...
    up = [t.detach().float() for t in bf]
    torch.testing.assert_close(out, ms_deform_attn(up[0], shapes, starts, up[1], up[2]), atol=0, rtol=0)
    # ... hence close to the float32 result.
    torch.testing.assert_close(out, reference32, atol=3e-2, rtol=3e-2)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in bf)


# ------------------------------------------------------------------------------------------------
# Input validation


def _bad_cases():
    cases = {
        "value rank": (lambda v, s, i, lo, a: (v[0], s, i, lo, a), "value must be 4-D"),
        "loc rank": (lambda v, s, i, lo, a: (v, s, i, lo[0], a), "sampling_locations must be 6-D"),
        "attn rank": (lambda v, s, i, lo, a: (v, s, i, lo, a[..., None]), "attention_weights must be 5-D"),
        "shapes rank": (lambda v, s, i, lo, a: (v, s.flatten(), i, lo, a), "spatial_shapes must be 2-D"),
        "shapes columns": (lambda v, s, i, lo, a: (v, torch.cat([s, s[:, :1]], 1), i, lo, a),
                           r"spatial_shapes must have shape \(L, 2\)"),
        "shapes float": (lambda v, s, i, lo, a: (v, s.double(), i, lo, a), "spatial_shapes must be an int64"),
        "shapes int32": (lambda v, s, i, lo, a: (v, s.int(), i, lo, a), "spatial_shapes must be an int64"),
        "index float": (lambda v, s, i, lo, a: (v, s, i.double(), lo, a), "level_start_index must be an int64"),
        "index length": (lambda v, s, i, lo, a: (v, s, i[:1], lo, a), r"level_start_index.shape\[0\]"),
        "index values": (lambda v, s, i, lo, a: (v, s, i + torch.tensor([0, 1]), lo, a),
                         r"level_start_index\[1\] = 21, expected 20"),
        "shapes sum": (lambda v, s, i, lo, a: (torch.cat([v, v[:, :1]], 1), s, i, lo, a),
                       r"sum of H\*W over levels is 26 but value has S = 27"),
        "shapes too big": (lambda v, s, i, lo, a: (v, s * 2, i, lo, a), "do not fit in value"),
        "shapes nonpositive": (lambda v, s, i, lo, a: (v, s * torch.tensor([[1, 1], [0, 1]]), i, lo, a),
                               "must be positive"),
        "empty value": (lambda v, s, i, lo, a: (v[:, :0], s, i, lo, a), "S = 0"),
        "loc batch": (lambda v, s, i, lo, a: (v, s, i, lo[:1], a), r"sampling_locations.shape\[0\] = 1"),
        "loc heads": (lambda v, s, i, lo, a: (v, s, i, lo[:, :, :1], a), r"sampling_locations.shape\[2\] = 1"),
        "loc levels": (lambda v, s, i, lo, a: (v, s, i, lo[:, :, :, :1], a), r"sampling_locations.shape\[3\] = 1"),
        "loc xy": (lambda v, s, i, lo, a: (v, s, i, lo[..., :1], a), r"\(x, y\) axis of size 2"),
        "attn queries": (lambda v, s, i, lo, a: (v, s, i, lo, a[:, :1]), r"attention_weights.shape\[1\] = 1"),
        "attn points": (lambda v, s, i, lo, a: (v, s, i, lo, a[..., :1]), r"attention_weights.shape\[4\] = 1"),
        "loc dtype": (lambda v, s, i, lo, a: (v, s, i, lo.float(), a), r"sampling_locations dtype \(Float\) must match"),
        "attn dtype": (lambda v, s, i, lo, a: (v, s, i, lo, a.float()), r"attention_weights dtype \(Float\) must match"),
        "value int": (lambda v, s, i, lo, a: (v.long(), s, i, lo.long(), a.long()),
                      "value must be float32, float64, float16 or bfloat16"),
        "device": (lambda v, s, i, lo, a: (v, s.to("meta"), i, lo, a), "must be on the same device"),
    }
    return cases


BAD = _bad_cases()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(ops, make_inputs, case):
    mutate, message = BAD[case]
    inputs = mutate(*make_inputs(N=2, Lq=3, M=2, D=4, shapes=((4, 5), (3, 2)), P=2))
    with pytest.raises((RuntimeError, ValueError), match=message):
        ms_deform_attn(*inputs)


def test_bad_im2col_step_and_grad_output(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=4)
    with pytest.raises(RuntimeError, match="im2col_step must be positive"):
        ms_deform_attn(value, shapes, starts, loc, attn, im2col_step=0)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \(N, Lq, M\*D\)"):
        ops.ms_deform_attn_backward(value, shapes, starts, loc, attn, torch.zeros(2, 3, 7, dtype=value.dtype), 64)
    with pytest.raises(RuntimeError, match="grad_output dtype"):
        ops.ms_deform_attn_backward(value, shapes, starts, loc, attn, torch.zeros(2, 3, 8), 64)


def test_nan_and_inf_locations_are_out_of_range(ops, make_inputs):
    value, shapes, starts, loc, attn = make_inputs(N=1, Lq=3, M=1, D=4)
    loc = loc.clone()
    loc[0, 0] = float("nan")
    loc[0, 1] = float("inf")
    loc[0, 2] = -1e30
    out, g_value, g_loc, g_attn = grads(ms_deform_attn, (value, shapes, starts, loc, attn))
    assert not out.any() and not g_value.any() and not g_loc.any() and not g_attn.any()


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_reference], ids=["op", "reference"])
def test_nonfinite_locations_same_with_and_without_extension(make_inputs, fn):
    """NaN/inf locations are out of range in the compiled kernels and in the pure-PyTorch fallback
    alike (zero output and gradients), so results do not depend on whether the extension is built;
    the finite samples of the same rows are unaffected."""
    if fn is ms_deform_attn and not stm_cuda_ops.has_compiled_op():
        pytest.skip("compiled extension not loaded")
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=4, M=2, D=4, shapes=((4, 5), (3, 2)), P=2, seed=4)
    clean = loc.clone()
    loc = loc.clone()
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1, 1] = float("inf")
    loc[1, 2, 0, 1, 0, 0] = -float("inf")
    loc[1, 3, 1, 0, 1] = float("nan")
    bad = ~torch.isfinite(loc).all(-1)  # (N, Lq, M, L, P)
    out, g_value, g_loc, g_attn = grads(fn, (value, shapes, starts, loc, attn))
    assert torch.isfinite(out).all() and torch.isfinite(g_value).all()
    assert torch.isfinite(g_loc).all() and torch.isfinite(g_attn).all()
    assert not g_loc[bad].any() and not g_attn[bad].any()
    # Same as dropping those samples (attention weight 0 at a finite location).
    dropped = attn.masked_fill(bad, 0)
    want = grads(ms_deform_attn_reference, (value, shapes, starts, clean, dropped))
    torch.testing.assert_close(out, want[0], **F64)
    torch.testing.assert_close(g_value, want[1], **F64)
    torch.testing.assert_close(g_loc[~bad], want[2][~bad], **F64)
    torch.testing.assert_close(g_attn[~bad], want[3][~bad], **F64)


@pytest.mark.parametrize("fn", [ms_deform_attn, ms_deform_attn_reference], ids=["op", "reference"])
@pytest.mark.parametrize("position,name", list(enumerate(
    ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"])))
def test_numpy_input_is_a_type_error_naming_the_argument(make_inputs, fn, position, name):
    inputs = list(make_inputs(N=1, Lq=2, M=1, D=2, shapes=((2, 3),), P=1))
    inputs[position] = inputs[position].numpy()
    with pytest.raises(TypeError, match=rf"ms_deform_attn: {name} must be a torch.Tensor, got numpy.ndarray "
                                        r"\(convert it with torch.from_numpy"):
        fn(*inputs)


# ------------------------------------------------------------------------------------------------
# The pure-PyTorch path: use_reference(), static shapes, jit tracing


def test_use_reference_runs_the_reference_without_a_warning(make_inputs, recwarn):
    """Inside use_reference() the op is exactly the reference (also where the kernels are built), silently;
    the setting is restored on exit, also after an error."""
    inputs = make_inputs(N=2, Lq=3, M=2, D=4, seed=5)
    with stm_cuda_ops.use_reference():
        got = grads(ms_deform_attn, inputs)
        with stm_cuda_ops.use_reference(False):
            assert stm_cuda_ops._ops._state["use_reference"] is False
    want = grads(ms_deform_attn_reference, inputs)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not [w for w in recwarn.list if "stm_cuda_ops" in str(w.message)]
    with pytest.raises(RuntimeError, match="boom"), stm_cuda_ops.use_reference():
        raise RuntimeError("boom")
    assert stm_cuda_ops._ops._state["use_reference"] is False


def test_static_shapes_are_used_instead_of_the_tensor(make_inputs):
    """With static_shapes the reference never reads spatial_shapes (here on the meta device, where reading
    it fails), and computes the same thing."""
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=4, seed=6)
    want = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    static = [tuple(row) for row in shapes.tolist()]
    got = ms_deform_attn_reference(value, shapes.to("meta"), starts, loc, attn, static_shapes=static)
    assert torch.equal(got, want)
    with stm_cuda_ops.use_reference():
        assert torch.equal(ms_deform_attn(value, shapes.to("meta"), starts, loc, attn, static_shapes=static), want)
    with pytest.raises(RuntimeError, match="spatial_shapes has 2 levels but sampling_locations has L = 3"):
        ms_deform_attn_reference(value, shapes, starts, loc, attn, static_shapes=static[:2])


def test_reference_is_one_opaque_node_under_jit_trace(make_inputs):
    """torch.jit.trace (fvcore's FLOP counter) records the reference as one node, as it records the
    compiled op, with the reference's output and gradients."""
    value, shapes, starts, loc, attn = make_inputs(N=2, Lq=3, M=2, D=4, seed=7)
    with stm_cuda_ops.use_reference(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated (fvcore still uses it)
        traced = torch.jit.trace(lambda v, lo, a: ms_deform_attn(v, shapes, starts, lo, a), (value, loc, attn),
                                 check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "prim::PythonOp" in kinds and "aten::grid_sampler" not in kinds
    got = grads(lambda v, _s, _t, lo, a: traced(v, lo, a), (value, shapes, starts, loc, attn))
    want = grads(ms_deform_attn_reference, (value, shapes, starts, loc, attn))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


# ------------------------------------------------------------------------------------------------
# Fuzz


@fuzz_op_shapes(max_examples=30, max_queries=6, head_dims=[1, 2, 3, 8, 16, 17, 32])
def test_fuzz_against_reference(ops, make_inputs, N, Lq, M, D, levels, P, spread, seed):
    assert_matches_reference(make_inputs(N, Lq, M, D, tuple(levels), P, spread=spread, seed=seed))
