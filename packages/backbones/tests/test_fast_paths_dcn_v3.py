"""DCNv3 fast path (`stm_backbones.fast.dcn`) against the block's plain forward (`fast_paths(False)`).

The plain forward is the reference's formulation: F.pad of the projected values, locations
`ref + (grid + offsets)·scaler / (Wp, Hp)` in the padded frame, F.softmax, γ·branch, DropPath, residual.
The fast path samples the *unpadded* value map with locations in the unpadded frame, folds the location
transform into one GEMM with the attention logits, uses `softmax_lastdim`, folds γ, accumulates the
residual in the GEMMs and runs the MLP in row chunks. Both must agree in float32 to 1e-5 (outputs and
gradients), through the compiled op and through stm_cuda_ops' pure-PyTorch reference (`op_backend`).
"""

import pytest
import torch
import torch.nn.functional as F
from bb_test_utils import assert_grads_close, grads_of

import stm_backbones
from stm_backbones import fast_paths
from stm_backbones.fast import dcn as fast_dcn
from stm_backbones.fast.softmax import softmax_lastdim
from stm_backbones.models import dcn_v3
from stm_backbones.models.dcn_v3 import DCNv3Block, DeformableAttention

DIM, HEADS = 16, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def stage_inputs(height, width):
    return DCNv3Block.extra_inputs(torch.empty(1, 3, 4 * height, 4 * width))[0]


def plain(fn):
    """`fn` with every fast path switched off: the model file's plain formulation."""
    def run(*args):
        with fast_paths.fast_paths(False):
            return fn(*args)
    return run


def attention_plain(attn, u, extra):
    return plain(attn)(u, extra)


def block_plain(block, inputs):
    return plain(block)(inputs)


def randomise(module, offset_std=1.5, std=0.3):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, offset_std if "sampling_offsets" in name else std)
    return module


def make_block(drop_path=0.0, layer_scale=0.5, dtype=torch.float32):
    block = DCNv3Block(dim=DIM, num_heads=(HEADS,), layer_scale_init_value=layer_scale, drop_path=drop_path)
    return randomise(block).to(dtype)


def test_plain_forward_pads_the_value_map(monkeypatch):
    """The plain path is the reference's padded formulation; the fast one never pads (the point of it)."""
    attn = randomise(DeformableAttention(DIM, HEADS))
    u, extra = torch.randn(1, 4, 5, DIM), stage_inputs(4, 5)
    pads = []
    real_pad = F.pad
    monkeypatch.setattr(F, "pad", lambda *a, **k: pads.append(a[1]) or real_pad(*a, **k))
    with torch.no_grad():
        attention_plain(attn, u, extra)
        assert pads == [(0, 0, 1, 1, 1, 1)]
        attn(u, extra)
    assert len(pads) == 1


# ----------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("size", [(5, 7), (8, 3), (14, 14), (1, 6)])
def test_attention_matches_padded_formulation(op_backend, size):
    """Large offsets: many samples fall in the padding ring or outside the map (zeros either way)."""
    attn = randomise(DeformableAttention(DIM, HEADS))
    u = torch.randn(2, *size, DIM)
    extra = stage_inputs(*size)
    with torch.no_grad():
        torch.testing.assert_close(attn(u, extra), attention_plain(attn, u, extra), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_gradients(op_backend, dtype):
    attn = randomise(DeformableAttention(DIM, HEADS)).to(dtype)
    u = torch.randn(2, 6, 9, DIM, dtype=dtype)
    extra = stage_inputs(6, 9)
    out, grads = grads_of(attn, u, lambda m, t: m(t, extra))
    want_out, want = grads_of(attn, u, lambda m, t: attention_plain(m, t, extra))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    assert_grads_close(grads, want, rtol=tol)


def test_attention_other_points_and_scaler(op_backend):
    """25 points (pad 2), per-head dilation rates and an offsets scaler other than 1."""
    attn = randomise(DeformableAttention(DIM, HEADS, points=25, dilation_rates=(1, 2), offsets_scaler=0.7))
    u = torch.randn(2, 6, 5, DIM)
    extra = DCNv3Block.extra_inputs(torch.empty(1, 3, 24, 20), deform_points=25)[0]
    with torch.no_grad():
        torch.testing.assert_close(attn(u, extra), attention_plain(attn, u, extra), **TOL)


def test_attention_without_deform_padding(op_backend):
    attn = randomise(DeformableAttention(DIM, HEADS, deform_padding=False))
    u = torch.randn(2, 5, 7, DIM)
    extra = DCNv3Block.extra_inputs(torch.empty(1, 3, 20, 28), deform_padding=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(attn(u, extra), attention_plain(attn, u, extra), **TOL)


def test_attention_bfloat16_autocast_same_function():
    attn = randomise(DeformableAttention(DIM, HEADS), offset_std=0.3)
    u = torch.randn(2, 6, 9, DIM)
    extra = stage_inputs(6, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = attn(u, extra), attention_plain(attn, u, extra)
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=3e-2 * want.abs().max().item())


# ----------------------------------------------------------------------------------- block
@pytest.mark.parametrize("chunked", [False, True])
def test_block_eval_and_gradients(op_backend, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block()
    x = torch.randn(2, DIM, 6, 9)
    extra = stage_inputs(6, 9)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()((x, extra))[0], block_plain(block, (x, extra))[0], **TOL)
    block.train()
    out, grads = grads_of(block, x, lambda m, t: m((t, extra))[0])
    want_out, want = grads_of(block, x, lambda m, t: block_plain(m, (t, extra))[0])
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


@pytest.mark.parametrize("layer_scale", [0.5, 0.0])
def test_block_drop_path_draws_and_gradients_match(layer_scale):
    block = make_block(drop_path=0.5, layer_scale=layer_scale).train()
    x = torch.randn(8, DIM, 4, 5)
    extra = stage_inputs(4, 5)
    torch.manual_seed(5)
    out, grads = grads_of(block, x, lambda m, t: m((t, extra))[0])
    torch.manual_seed(5)
    want_out, want = grads_of(block, x, lambda m, t: block_plain(m, (t, extra))[0])
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


def test_block_float64(tiny_chunks):
    block = make_block(dtype=torch.float64).train()
    x = torch.randn(2, DIM, 6, 9, dtype=torch.float64)
    extra = stage_inputs(6, 9)
    out, grads = grads_of(block, x, lambda m, t: m((t, extra))[0])
    want_out, want = grads_of(block, x, lambda m, t: block_plain(m, (t, extra))[0])
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    assert_grads_close(grads, want, rtol=1e-9)


# ----------------------------------------------------------------------------------- models (float32)
def test_classifier_logits_and_gradients(op_backend):
    model = stm_backbones.create_model("unified_dcn_v3_micro", num_classes=10, layer_scale_init_value=0.5)
    randomise(model, offset_std=0.05, std=0.05)
    image = torch.randn(2, 3, 64, 96)
    model.eval()
    with torch.no_grad():
        fast, want = model(image), plain(model)(image)
    torch.testing.assert_close(fast, want, **TOL)
    _, grads = grads_of(model, image, lambda m, t: m(t))
    _, want_grads = grads_of(model, image, lambda m, t: plain(m)(t))
    assert_grads_close(grads, want_grads)


def test_dense_backbone_non_square():
    dense = stm_backbones.create_dense_backbone("unified_dcn_v3_micro", layer_scale_init_value=0.5).eval()
    randomise(dense, offset_std=0.05, std=0.05)
    image = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        fast, want = dense(image), plain(dense)(image)
    for got, ref in zip(fast, want):
        torch.testing.assert_close(got, ref, **TOL)


# ----------------------------------------------------------------------------------- helpers and caches
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softmax_lastdim(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 5, 4, 9, generator=gen) * 4).to(dtype).requires_grad_()
    y = softmax_lastdim(x)
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == want_dtype
    ref_x = x.detach().to(want_dtype).requires_grad_()
    ref = F.softmax(ref_x, -1)
    # Tolerances from the arithmetic, not from one run: both sides compute in want_dtype (eps), the
    # softmax outputs are in [0, 1] and differ by a few roundings of exp/sum/divide; the gradient
    # y * (g - <g, y>) sums n = 9 products, so its rounding error grows with n * max|g|.
    eps = torch.finfo(want_dtype).eps
    n = x.shape[-1]
    torch.testing.assert_close(y, ref, rtol=0, atol=8 * eps)
    g = torch.randn(ref.shape, generator=gen, dtype=want_dtype)
    (gx,) = torch.autograd.grad(y, x, g)
    (want,) = torch.autograd.grad(ref, ref_x, g)
    assert gx.dtype == dtype
    # bfloat16 gradients are computed in float32, then rounded to bfloat16: a relative error of eps(bf16).
    grad_rtol = torch.finfo(dtype).eps if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(gx.to(want_dtype), want, rtol=grad_rtol, atol=4 * n * eps * float(g.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(softmax_lastdim(x), ref.detach(), rtol=0, atol=8 * eps)


def test_extra_inputs_cached_per_image_size():
    first = DCNv3Block.extra_inputs(torch.empty(2, 3, 64, 96))
    again = DCNv3Block.extra_inputs(torch.empty(1, 3, 64, 96))
    other = DCNv3Block.extra_inputs(torch.empty(1, 3, 96, 64))
    assert all(a[0] is b[0] and a[1] is b[1] for a, b in zip(first, again))
    assert first[0][3] == (16, 24) and other[0][3] == (24, 16)
    assert first is not again  # a fresh list each call: the caller may not mutate the cache through it
    for i in range(40):  # bounded: detection feeds many sizes
        DCNv3Block.extra_inputs(torch.empty(1, 3, 32 * (i + 1), 32))
    assert len(dcn_v3._EXTRA_INPUTS.entries) <= dcn_v3._EXTRA_INPUTS.capacity


def test_cached_tensors_made_in_inference_mode_stay_out_of_autograd():
    """Tensors cached under torch.inference_mode() are not reused by a later forward with autograd."""
    block = make_block().train()
    x = torch.randn(1, DIM, 4, 4)
    with torch.inference_mode():
        extra = DCNv3Block.extra_inputs(torch.empty(1, 3, 16, 16))[0]
        block((x, extra))
        assert fast_dcn._level_tensors(4, 4, x.device)[0].is_inference()
    extra = DCNv3Block.extra_inputs(torch.empty(1, 3, 16, 16))[0]
    assert not extra[0].is_inference() and not fast_dcn._level_tensors(4, 4, x.device)[0].is_inference()
    out = block((x.requires_grad_(), extra))[0]
    out.sum().backward()
    assert x.grad is not None


def test_block_compiles_fullgraph():
    block = make_block().eval()
    x = torch.randn(2, DIM, 6, 9)
    extra = stage_inputs(6, 9)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled((x, extra))[0], block_plain(block, (x, extra))[0], **TOL)


def test_no_graph_breaks_in_training_with_drop_path():
    block = make_block(drop_path=0.3).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)((torch.randn(2, DIM, 6, 9), stage_inputs(6, 9)))
    assert explained.graph_break_count == 0, explained.break_reasons
