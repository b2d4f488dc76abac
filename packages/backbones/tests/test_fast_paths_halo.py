"""The Halo fast path (Linear k|v projection, window gather with a block-sum backward, relative logits as one
batched product, -inf additive mask, SDPA / baddbmm) against the plain formulation (`fast_paths(False)`)."""

import pytest
import torch
from bb_test_utils import check_drop_path_samples, check_models_match, check_training_step_against, traced_op_kinds

import stm_backbones
from stm_backbones.fast import halo as fast_halo
from stm_backbones.fast.halo import _halo_windows_reference, halo_windows, halo_windows_grad
from stm_backbones.fast_paths import fast_paths
from stm_backbones.models.halo import HaloAttn, UnifiedHaloBlock

BS, HALO, WIN = 7, 3, 13


# ----------------------------------------------------------------------------------- the plain formulation
def _plain(module, x):
    """The module's plain formulation (1x1 conv for k|v, F.pad + unfold, q·kᵀ·scale + pos_embed(q), masked_fill)."""
    with fast_paths(False):
        return module(x)


def randomise(module, table_std=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, table_std if "_rel" in name else 0.3)
    return module


def make_block(dim=16, heads=2, dense=False, drop_path=0.0, dtype=torch.float32):
    block = UnifiedHaloBlock(dim=dim, stage=0, num_heads=(heads,), layer_scale_init_value=0.5, dense=dense,
                             drop_path=drop_path)
    return randomise(block).to(dtype)


CASES = [  # (dense, size, dim, heads)
    (False, (14, 21), 16, 2), (False, (7, 7), 64, 2), (False, (21, 14), 8, 1), (False, (28, 28), 16, 2),
    (True, (10, 12), 16, 2), (True, (3, 16), 16, 2), (True, (14, 8), 16, 2), (True, (9, 23), 24, 3),
]


# ----------------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("dense, size, dim, heads", CASES)
def test_inference_matches_plain(dense, size, dim, heads):
    block = make_block(dim, heads, dense).eval()
    x = torch.randn(2, *size, dim)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, _plain(block, x), atol=1e-5, rtol=1e-5)
    assert out.shape == x.shape


@pytest.mark.parametrize("dense, size, dim, heads", CASES)
def test_training_path_and_gradients_match_plain(dense, size, dim, heads):
    block = make_block(dim, heads, dense).train()
    check_training_step_against(block, torch.randn(2, *size, dim), _plain)


@pytest.mark.parametrize("dense", [False, True])
def test_mlp_in_row_chunks_matches_plain(dense, tiny_chunks):
    """The MLP in row chunks (what large maps get) in inference and in a training step."""
    block = make_block(16, 2, dense)
    x = torch.randn(2, 14, 21, 16)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), _plain(block, x), atol=1e-5, rtol=1e-5)
    check_training_step_against(block.train(), x, _plain)


def test_double_precision_matches_plain_tightly():
    for training in (False, True):
        block = make_block(dense=True, dtype=torch.float64).train(training)
        x = torch.randn(2, 10, 12, 16, dtype=torch.float64)
        with torch.set_grad_enabled(training):
            torch.testing.assert_close(block(x), _plain(block, x), atol=1e-12, rtol=1e-12)


def test_outside_keys_get_no_weight_with_huge_logits_in_both_paths():
    """-inf in the additive mask gives outside keys exactly the zero weight of the -finfo.max fill."""
    attn = randomise(HaloAttn(16, 2), table_std=3000.0).double()
    x = torch.randn(1, 7, 7, 16, dtype=torch.float64)
    expected = _plain(attn, x)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=1e-10)  # autograd (baddbmm) path


def test_drop_path_draws_the_same_samples():
    check_drop_path_samples(make_block(drop_path=0.5).train(), torch.randn(6, 14, 14, 16), _plain, seed=3)


# ----------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("size, block_size, halo", [((14, 21), 7, 3), ((8, 12), 4, 3), ((6, 6), 3, 1)])
def test_halo_windows_and_their_gradient(size, block_size, halo):
    kv = torch.randn(2, *size, 3, 5, dtype=torch.float64, requires_grad=True)
    k, v = halo_windows(kv, block_size, halo, 2)
    k_ref, v_ref = _halo_windows_reference(kv, block_size, halo, 2)
    assert torch.equal(k, k_ref) and torch.equal(v, v_ref) and k.is_contiguous() and v.is_contiguous()
    gk, gv = torch.randn_like(k), torch.randn_like(v)
    expected = torch.autograd.grad((k_ref * gk).sum() + (v_ref * gv).sum(), kv)[0]
    torch.testing.assert_close(torch.autograd.grad((k * gk).sum() + (v * gv).sum(), kv)[0], expected)
    torch.testing.assert_close(torch.autograd.grad((k * gk).sum(), kv)[0],
                               torch.autograd.grad((k_ref * gk).sum(), kv)[0])  # only one output used
    torch.autograd.gradcheck(lambda t: halo_windows(t, block_size, halo, 2), (kv,), fast_mode=True)


@pytest.mark.parametrize("size, block_size, halo", [((14, 21), 7, 3), ((8, 12), 4, 3), ((6, 6), 3, 1)])
@pytest.mark.parametrize("used", ["both", "k", "v"])
def test_functional_window_gradient_equals_in_place(size, block_size, halo, used):
    """The torch.compile form of the window backward (padded pieces summed) equals the eager in-place one."""
    kv = torch.randn(2, *size, 3, 5, dtype=torch.float64)
    k, v = _halo_windows_reference(kv, block_size, halo, 2)
    grads = (None if used == "v" else torch.randn_like(k), None if used == "k" else torch.randn_like(v))
    in_place = halo_windows_grad(grads, kv.shape, block_size, halo, 2)
    functional = halo_windows_grad(grads, kv.shape, block_size, halo, 2, functional=True)
    assert functional.shape == kv.shape
    torch.testing.assert_close(functional, in_place, rtol=1e-12, atol=1e-12)


def test_compiled_window_gradient_matches_eager():
    kv = torch.randn(2, 8, 12, 3, 5, requires_grad=True)
    gk, gv = torch.randn(2, 3, 2, 3, 10, 10, 2), torch.randn(2, 3, 2, 3, 10, 10, 3)

    def loss(t):
        k, v = halo_windows(t, 4, 3, 2)
        return (k * gk).sum() + (v * gv).sum()

    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(kv), kv)[0]
    torch.testing.assert_close(compiled, torch.autograd.grad(loss(kv), kv)[0], rtol=1e-5, atol=1e-5)


def test_position_tables_give_the_relative_logits():
    attn = randomise(HaloAttn(16, 2)).double()
    q = torch.randn(2, 2, 6, BS * BS, 8, dtype=torch.float64)
    tables = fast_halo.position_tables(attn.pos_embed)  # (bs², d, win²)
    assert tables.shape == (BS * BS, 8, WIN * WIN)
    fast = torch.einsum("bhnpd,pdk->bhnpk", q, tables)
    torch.testing.assert_close(fast, attn.pos_embed(q), atol=1e-12, rtol=1e-12)


def test_additive_mask_is_cached_off_the_state_dict():
    attn = HaloAttn(16, 2)
    mask = fast_halo.additive_key_mask(attn, 14, 21, torch.device("cpu"), torch.float32)
    assert mask.shape == (6, WIN * WIN) and mask.dtype == torch.float32
    assert torch.equal(torch.isinf(mask), attn.halo_mask(14, 21, torch.device("cpu"))[0, :, 0])
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}
    assert not any("mask" in k for k in attn.state_dict())
    assert not any("mask" in n for n, _ in attn.named_buffers())


def test_fvcore_trace_sees_the_plain_ops():
    """Traced graphs (fvcore FLOP counts) take the plain formulation: no custom autograd ops, no fused attention."""
    kinds = traced_op_kinds(make_block().eval(), torch.randn(1, 14, 14, 16))
    assert "prim::PythonOp" not in kinds and "aten::scaled_dot_product_attention" not in kinds
    assert {"aten::unfold", "aten::masked_fill", "aten::softmax"} <= kinds


# ----------------------------------------------------------------------------------- models
def test_models_match_plain_path():
    """Whole models (a classifier and a dense backbone at a non-square size): fast path against plain."""
    check_models_match("unified_halo_micro", _plain, image_size=224, tol=1e-4)


def test_bf16_autocast_runs_both_paths_close_to_float32():
    model = stm_backbones.create_dense_backbone("unified_halo_micro").eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference = torch.cat([m.flatten() for m in model(image)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inference = torch.cat([m.float().flatten() for m in model(image)])
    torch.testing.assert_close(inference, reference, atol=0.15, rtol=0.1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sum(m.float().sum() for m in model(image))
    out.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
