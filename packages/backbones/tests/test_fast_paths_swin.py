"""The Swin fast path (`stm_backbones.fast.swin`: token gathers, one additive bias+mask, SDPA, fused residuals)
against the block's plain forward (`fast_paths(False)`: roll + window_partition, q·kᵀ + bias + mask, softmax,
window_reverse + roll), which `test_swin.py` checks against naive per-window formulas."""

import pytest
import timm
import torch
from bb_test_utils import check_training_step_against
from timm.layers import DropPath

import stm_backbones
from stm_backbones import fast_paths
from stm_backbones.fast import swin as fast_swin
from stm_backbones.fast.softmax import softmax_flush_denormals
from stm_backbones.fast.windows import permute_tokens, window_order
from stm_backbones.models.swin import SwinBlock, window_partition, window_reverse

DIM, HEADS = 16, 2


def _reference_forward(block: SwinBlock, x):
    """The block's plain formulation."""
    with fast_paths.fast_paths(False):
        return block(x)


def make_block(resolution, depth, dense=False, drop_path=0.0, dtype=torch.float32):
    block = SwinBlock(dim=DIM, stage=0, depth=depth, input_resolution=resolution, num_heads=(HEADS,),
                      layer_scale_init_value=0.5, dense=dense, drop_path=drop_path).to(dtype)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 1.0 if "relative_position_bias_table" in name else 0.3)
    return block


CASES = [  # (resolution, depth, dense, input size)
    ((14, 14), 1, False, (14, 14)), ((14, 21), 1, False, (14, 21)), ((14, 14), 0, False, (14, 14)),
    ((7, 7), 1, False, (7, 7)), ((4, 4), 1, False, (4, 4)), ((16, 16), 1, False, (16, 16)),
    ((56, 56), 1, True, (10, 12)), ((56, 56), 1, True, (5, 9)), ((56, 56), 0, True, (10, 12)),
    ((56, 56), 3, True, (3, 16)), ((56, 56), 1, True, (14, 21)),
]


# ----------------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("resolution, depth, dense, size", CASES)
def test_inference_matches_reference(resolution, depth, dense, size):
    block = make_block(resolution, depth, dense).eval()
    x = torch.randn(2, DIM, *size)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, _reference_forward(block, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x), out, atol=0, rtol=0)  # second call: cached bias/mask, same result
    assert out.shape == x.shape


@pytest.mark.parametrize("resolution, depth, dense, size", CASES)
def test_training_path_and_gradients_match_reference(resolution, depth, dense, size):
    block = make_block(resolution, depth, dense).train()
    check_training_step_against(block, torch.randn(2, DIM, *size), _reference_forward)


@pytest.mark.parametrize("dense", [False, True])
def test_mlp_in_row_chunks_matches_reference(dense, tiny_chunks):
    """The MLP in row chunks (what large maps get) in inference and in a training step."""
    block = make_block((14, 21), 1, dense)
    x = torch.randn(2, DIM, 14, 21)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), _reference_forward(block, x), atol=1e-5, rtol=1e-5)
    check_training_step_against(block.train(), x, _reference_forward)


def test_double_precision_matches_reference_tightly():
    for training in (False, True):
        block = make_block((14, 21), 1, dtype=torch.float64).train(training)
        x = torch.randn(2, DIM, 14, 21, dtype=torch.float64)
        with torch.set_grad_enabled(training):
            torch.testing.assert_close(block(x), _reference_forward(block, x), atol=1e-12, rtol=1e-12)


def test_drop_path_draws_the_same_samples():
    block = make_block((14, 14), 1, drop_path=0.5).train()
    assert isinstance(block.drop_path, DropPath)
    x = torch.randn(6, DIM, 14, 14)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, _reference_forward(block, x), atol=1e-5, rtol=1e-5)


def test_channels_last_output_and_input_layouts():
    block = make_block((14, 14), 1).eval()
    x = torch.randn(2, DIM, 14, 14)
    with torch.no_grad():
        out = block(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), out, atol=0, rtol=0)


# ----------------------------------------------------------------------------------- caches and buffers
def test_cached_bias_follows_table_updates_and_state_dict_is_unchanged():
    block = make_block((14, 14), 1).eval()
    assert sorted(block.state_dict()) == sorted([
        "gamma_1", "gamma_2", "attn_mask", "norm1.weight", "norm1.bias", "attn.relative_position_bias_table",
        "attn.relative_position_index", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"])
    x = torch.randn(2, DIM, 14, 14)
    with torch.no_grad():
        before = block(x)
        block.attn.relative_position_bias_table.mul_(-1.0)  # in place: the cache must notice
        after = block(x)
        torch.testing.assert_close(after, _reference_forward(block, x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(before, after)
        state = {k: v.clone() for k, v in block.state_dict().items()}
        state["attn.relative_position_bias_table"].normal_()
        block.load_state_dict(state)
        torch.testing.assert_close(block(x), _reference_forward(block, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(block(x.double().float()), block(x))
    assert not any("cache" in name for name, _ in block.named_buffers())


def test_window_order_is_roll_plus_partition():
    for height, width, window, shift in ((14, 21, 7, 3), (14, 14, 7, 0), (8, 8, 4, 2)):
        y = torch.randn(2, height, width, 5)
        order, inverse = window_order(height, width, window, shift)
        windows = permute_tokens(y.reshape(2, -1, 5), order, inverse).view(-1, window * window, 5)
        expected = window_partition(torch.roll(y, (-shift, -shift), (1, 2)), window)
        assert torch.equal(windows, expected)
        back = permute_tokens(windows.reshape(2, -1, 5), inverse, order).view(2, height, width, 5)
        assert torch.equal(back, y)
        assert torch.equal(torch.roll(window_reverse(expected, window, height, width), (shift, shift), (1, 2)), y)


def test_permute_tokens_gradient_is_the_inverse_gather():
    order, inverse = window_order(14, 14, 7, 3)
    x = torch.randn(2, 196, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: permute_tokens(t, order, inverse), (x,))


def test_softmax_flush_denormals():
    logits = torch.tensor([[0.0, -100.0, 1.0, -200.0]], requires_grad=True)
    probs = softmax_flush_denormals(logits)
    assert probs[0, 1] == 0 and probs[0, 3] == 0  # e^-100 ≈ 4e-44 is a float32 denormal
    torch.testing.assert_close(probs, logits.softmax(-1), atol=1e-40, rtol=0)
    grad = torch.randn(1, 4)
    probs.backward(grad)
    expected = torch.autograd.grad(logits.softmax(-1), logits, grad)[0]
    torch.testing.assert_close(logits.grad, expected, atol=1e-7, rtol=1e-6)
    double = logits.detach().double()
    assert torch.equal(softmax_flush_denormals(double), double.softmax(-1))  # e^-100 is normal in float64


# ----------------------------------------------------------------------------------- the switch
def test_switch_selects_the_path(monkeypatch):
    block = make_block((14, 14), 1).eval()
    x = torch.randn(1, DIM, 14, 14)
    calls = []
    monkeypatch.setattr(fast_swin, "block_forward", lambda b, t: calls.append(b) or t)
    with torch.no_grad():
        assert block(x) is x and calls == [block]
        with fast_paths.fast_paths(False):
            assert block(x) is not x and calls == [block]
        with pytest.raises(ValueError, match="14x14"):  # the size check guards both paths
            with fast_paths.fast_paths(False):
                block(torch.randn(1, DIM, 7, 14))


# ----------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["unified_swin_micro", "official_swin_tiny"])
def test_model_matches_reference_blocks(name):
    kwargs = dict(num_classes=7, depths=(2, 2, 2, 2)) if name == "official_swin_tiny" else dict(num_classes=7)
    model = timm.create_model(name, **kwargs).eval()
    dense = stm_backbones.create_dense_backbone("unified_swin_micro").eval()
    image, dense_image = torch.randn(2, 3, 224, 224), torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        fast, fast_maps = model(image), dense(dense_image)
        with fast_paths.fast_paths(False):
            torch.testing.assert_close(fast, model(image), atol=1e-4, rtol=1e-4)
            for a, b in zip(fast_maps, dense(dense_image)):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs_both_paths_close_to_float32():
    model = timm.create_model("unified_swin_micro", num_classes=5, img_size=64).eval()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(image)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inference = model(image)
    torch.testing.assert_close(inference.float(), reference, atol=0.15, rtol=0.1)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
