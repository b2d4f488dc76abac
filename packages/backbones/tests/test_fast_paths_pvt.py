"""PVT fast paths (`stm_backbones.fast.pvt`) against the blocks' plain forward (`fast_paths(False)`).

The fast blocks use fused SDPA for the spatial-reduction attention, fold γ into `proj` / `fc2`, accumulate the
residual in the GEMMs, fuse γ and DropPath into one pass and run the MLP in row chunks (`stm_backbones.fast`).
The plain forward is the straightforward formulation (matmul attention scaled after q·kᵀ, softmax, γ·branch,
DropPath, residual add; `test_pvt.py` checks it against naive formulas), and both must agree in float32 to
1e-5: outputs and gradients, classification and dense blocks, square and non-square maps, chunked and
unchunked MLPs.
"""

import pytest
import timm
import torch
import torch.nn.functional as F
from bb_test_utils import assert_grads_close, check_classifier_against_straightforward, grads_of

import stm_backbones
from stm_backbones import fast_paths
from stm_backbones.fast import pvt as fast_pvt
from stm_backbones.fast.mlp import mlp_gelu
from stm_backbones.models.pvt import PvtBlock, PvtV2Block

DIM, HEADS = 16, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def straightforward_block(block, x):
    """The block's plain formulation."""
    with fast_paths.fast_paths(False):
        return block(x)


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
    with fast_paths.fast_paths(False):
        want = block.attn(y, 8, 8)
    torch.testing.assert_close(block.attn(y, 8, 8), want, **TOL)


@pytest.mark.parametrize("cls, forward", [(PvtBlock, "pvt_block_forward"), (PvtV2Block, "pvt_v2_block_forward")])
def test_switch_selects_the_path(cls, forward, monkeypatch):
    block = make_block(cls).eval()
    x = torch.randn(1, DIM, 8, 8)
    calls = []
    monkeypatch.setattr(fast_pvt, forward, lambda b, t: calls.append(b) or t)
    with torch.no_grad():
        assert block(x) is x and calls == [block]
        with fast_paths.fast_paths(False):
            assert block(x) is not x and calls == [block]


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
    """Switches the fast paths off until the monkeypatch context ends (what `fast_paths(False)` does)."""
    monkeypatch.setitem(fast_paths._state, "enabled", False)


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
        got = mlp_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=residual)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        if residual is not None:  # accumulating into the caller's own tensor
            mine = residual.clone()
            assert mlp_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, residual=mine, inplace=True) \
                .data_ptr() == mine.data_ptr()
            torch.testing.assert_close(mine, want, rtol=1e-12, atol=1e-12)
    params = [t for t in (x, fc1.weight, fc1.bias, fc2.weight, fc2.bias) if t is not None]
    torch.autograd.gradcheck(
        lambda *args: mlp_gelu(args[0], args[1], args[2] if bias else None, args[-2 if bias else -1],
                               args[-1] if bias else None),
        [p.detach().clone().requires_grad_() for p in params])


@pytest.mark.parametrize("dense", [False, True])
def test_no_graph_breaks_in_training_with_drop_path(dense):
    """torch.compile traces the fast block (its eager-only kernels off) in one graph (train mode, DropPath active)."""
    block = make_block(dense=dense, drop_path=0.3).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(2, DIM, 8, 8))
    assert explained.graph_break_count == 0, explained.break_reasons
