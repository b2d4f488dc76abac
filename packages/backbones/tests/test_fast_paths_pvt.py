"""PVT fast paths against the straightforward formulation written out here.

The blocks use fused SDPA for the spatial-reduction attention, fold γ into `proj` / `fc2`, accumulate the
residual in the GEMMs, fuse γ and DropPath into one pass and run the MLP in row chunks (`stm_backbones.ops`).
Here the same blocks are also evaluated the straightforward way (matmul attention scaled after q·kᵀ,
softmax, γ·branch, DropPath, residual add), and both must agree in float32 to 1e-5: outputs and gradients,
classification and dense blocks, square and non-square maps, chunked and unchunked MLPs.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from bb_test_utils import assert_grads_close, check_classifier_against_straightforward, grads_of

import stm_backbones
from stm_backbones import ops
from stm_backbones.models.pvt import PvtBlock, PvtV2Block, _tokens, _untokens

DIM, HEADS = 16, 2
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- straightforward formulation
def _scale(t, gamma):
    return t if gamma is None else gamma * t


def straightforward_sra(attn, y, height, width):
    batch, tokens, channels = y.shape
    q = attn.q(y).reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    z = attn.norm(_tokens(attn.sr(_untokens(y, height, width)))) if attn.sr_ratio > 1 else y
    kv = attn.kv(z).reshape(batch, -1, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    k, v = kv.unbind(0)
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))


def straightforward_block(block, x):
    """The blocks' forward as first written (PvtBlock: both modes; PvtV2Block)."""
    height, width = x.shape[-2:]
    pos_embed = getattr(block, "pos_embed", None)
    if isinstance(block, PvtBlock) and block.dense:
        identity = _tokens(x)
        if pos_embed is not None:
            if tuple(pos_embed.shape[-2:]) != (height, width):
                pos_embed = F.interpolate(pos_embed, size=(height, width), mode="bilinear", align_corners=True)
            x = x + pos_embed
        attended = straightforward_sra(block.attn, block.norm1(_tokens(x)), height, width)
        t = identity + block.drop_path(_scale(attended, block.gamma_1))
    else:
        if pos_embed is not None:
            x = x + pos_embed
        t = _tokens(x)
        t = t + block.drop_path(_scale(straightforward_sra(block.attn, block.norm1(t), height, width), block.gamma_1))
    mlp = block.mlp
    hidden = mlp.fc1(block.norm2(t))
    if isinstance(block, PvtV2Block):
        hidden = mlp.dwconv(hidden, height, width)
    t = t + block.drop_path(_scale(mlp.fc2(F.gelu(hidden)), block.gamma_2))
    return _untokens(t, height, width)


def make_block(cls=PvtBlock, depth=0, resolution=(8, 8), sr=2, dense=False, layer_scale=0.5, drop_path=0.0,
               dtype=torch.float32):
    block = cls(dim=DIM, stage=0, depth=depth, input_resolution=resolution, layer_scale_init_value=layer_scale,
                dense=dense, num_heads=(HEADS,), sr_ratios=(sr,), mlp_ratios=(4,), drop_path=drop_path)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.to(dtype)


# ----------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("sr", [1, 2, 4])
@pytest.mark.parametrize("depth", [0, 1])
def test_classification_block_eval(depth, sr, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block(depth=depth, resolution=(8, 12), sr=sr).eval()
    x = torch.randn(2, DIM, 8, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x), straightforward_block(block, x), **TOL)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (12, 20), (20, 12), (6, 10)])
def test_dense_block_eval_non_square(size, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block(dense=True, resolution=(8, 8)).eval()  # pos-embed resized to `size`
    x = torch.randn(2, DIM, *size)
    with torch.no_grad():
        torch.testing.assert_close(block(x), straightforward_block(block, x), **TOL)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dense,size", [(False, (8, 12)), (True, (12, 20)), (True, (6, 10))])
def test_block_gradients(dense, size, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block(dense=dense, resolution=(8, 12)).train()
    x = torch.randn(2, DIM, *size)
    out, grads = grads_of(block, x, lambda b, t: b(t))
    want_out, want = grads_of(block, x, straightforward_block)
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


@pytest.mark.parametrize("layer_scale", [0.5, 0.0])
def test_drop_path_draws_and_gradients_match(layer_scale):
    """Training with DropPath: the fused γ·DropPath pass draws the very samples timm's DropPath draws."""
    block = make_block(depth=0, layer_scale=layer_scale, drop_path=0.5).train()
    x = torch.randn(8, DIM, 8, 8)
    torch.manual_seed(3)
    out, grads = grads_of(block, x, lambda b, t: b(t))
    torch.manual_seed(3)
    want_out, want = grads_of(block, x, straightforward_block)
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


def test_gamma_not_folded_when_weights_outnumber_tokens():
    """Few tokens (4x4 map, batch 1) and a wide MLP: γ scales the outputs instead of the weights."""
    block = make_block(resolution=(4, 4), sr=1).train()
    x = torch.randn(1, DIM, 4, 4)
    assert block.mlp.fc2.in_features > 16  # more weight columns than rows: no folding
    out, grads = grads_of(block, x, lambda b, t: b(t))
    want_out, want = grads_of(block, x, straightforward_block)
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


@pytest.mark.parametrize("chunked", [False, True])
def test_pvt_v2_block(chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block(PvtV2Block).train()
    x = torch.randn(2, DIM, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), straightforward_block(block, x), **TOL)
    block.train()
    out, grads = grads_of(block, x, lambda b, t: b(t))
    want_out, want = grads_of(block, x, straightforward_block)
    torch.testing.assert_close(out, want_out, **TOL)
    assert_grads_close(grads, want)


def test_float64_is_exact_to_rounding(tiny_chunks):
    block = make_block(dense=True, dtype=torch.float64).train()
    x = torch.randn(2, DIM, 12, 20, dtype=torch.float64)
    out, grads = grads_of(block, x, lambda b, t: b(t))
    want_out, want = grads_of(block, x, straightforward_block)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert_grads_close(grads, want, rtol=1e-11)


def test_sdpa_attention_matches_scaled_after_product():
    block = make_block(sr=2)
    y = torch.randn(2, 64, DIM)
    torch.testing.assert_close(block.attn(y, 8, 8), straightforward_sra(block.attn, y, 8, 8), **TOL)


def test_bfloat16_autocast_same_function():
    block = make_block(dense=True).eval()
    x = torch.randn(2, DIM, 12, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        want = straightforward_block(block, x)
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=3e-2 * want.abs().max().item())


# ----------------------------------------------------------------------------------- models
def _straightforward(monkeypatch):
    monkeypatch.setattr(PvtBlock, "forward", straightforward_block)


def test_classifier_logits_and_gradients(monkeypatch):
    model = timm.create_model("unified_pvt_micro", num_classes=10, img_size=(64, 96), layer_scale_init_value=0.5)
    image = torch.randn(2, 3, 64, 96)
    check_classifier_against_straightforward(model, image, _straightforward, monkeypatch)


def test_dense_backbone_non_square(monkeypatch):
    dense = stm_backbones.create_dense_backbone("unified_pvt_micro", layer_scale_init_value=0.5).eval()
    image = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        fast = dense(image)
        with monkeypatch.context() as patch:
            _straightforward(patch)
            want = dense(image)
    for got, ref in zip(fast, want):
        torch.testing.assert_close(got, ref, **TOL)


# ----------------------------------------------------------------------------------- the MLP helper itself
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_mlp_gelu_helper(tiny_chunks, bias, with_residual):
    fc1, fc2 = torch.nn.Linear(6, 24, bias=bias).double(), torch.nn.Linear(24, 5, bias=bias).double()
    x = torch.randn(3, 11, 6, dtype=torch.float64)
    residual = torch.randn(3, 11, 5, dtype=torch.float64) if with_residual else None
    want = fc2(F.gelu(fc1(x))) + (0 if residual is None else residual)
    with torch.no_grad():
        got = ops.mlp_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if residual is not None:  # accumulating into the caller's own tensor
            mine = residual.clone()
            assert ops.mlp_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=mine, inplace=True) \
                .data_ptr() == mine.data_ptr()
            torch.testing.assert_close(mine, want, rtol=1e-12, atol=1e-12)
    params = [t for t in (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias) if t is not None]
    torch.autograd.gradcheck(
        lambda *args: ops.mlp_gelu(args[0], args[1], args[2] if bias else None, args[-2 if bias else -1],
                                   args[-1] if bias else None),
        [p.detach().clone().requires_grad_() for p in params])


@pytest.mark.parametrize("dense", [False, True])
def test_no_graph_breaks_in_training_with_drop_path(dense):
    """torch.compile sees the straightforward formulation in one graph (train mode, DropPath active)."""
    block = make_block(dense=dense, drop_path=0.3).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(2, DIM, 8, 8))
    assert explained.graph_break_count == 0, explained.break_reasons
