"""The ConvNeXt block's channels-last fast path against its plain NCHW formulation (`fast_paths(False)`)."""

import pytest
import timm
import torch
import torch.nn.functional as F
from bb_test_utils import assert_close_to_scale, check_drop_path_samples, check_models_match, traced_op_kinds
from timm.layers import DropPath

from stm_backbones.fast.depthwise import _DepthwiseConv2d, depthwise_conv, depthwise_weight_grad
from stm_backbones.fast.residual import residual_add
from stm_backbones.fast_paths import fast_paths
from stm_backbones.layers import scale
from stm_backbones.models.convnext import UnifiedConvNeXtBlock


def plain(module, x):
    """The module's plain formulation (LN2d -> 1x1 conv -> dw conv -> 1x1 conv, γ, DropPath; NHWC MLP)."""
    with fast_paths(False):
        return module(x)


def make_block(dim=32, layer_scale=0.5, drop_path=0.0):
    block = UnifiedConvNeXtBlock(dim=dim, layer_scale_init_value=layer_scale, drop_path=drop_path)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


@pytest.mark.parametrize("size", [(14, 14), (9, 13), (1, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layer_scale", [0.5, 0.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_block_matches_plain_forward(size, channels_last, layer_scale, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block(layer_scale=layer_scale).eval()
    x = torch.randn(2, 32, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = block(x)
        torch.testing.assert_close(out, plain(block, x), atol=1e-5, rtol=1e-5)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)


def test_block_matches_plain_double_tightly():
    block = make_block().double().eval()
    x = torch.randn(2, 32, 10, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(block, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("size", [(9, 11), (1, 1)])  # 1x1: the last stage of a 32 px classifier
@pytest.mark.parametrize("chunked", [False, True])  # the MLP in row chunks (as for large maps) or in one
def test_gradients_match_plain(size, chunked, request):
    if chunked:
        request.getfixturevalue("tiny_chunks")
    block = make_block().train()
    x = torch.randn(2, 32, *size, requires_grad=True)
    grad = torch.randn(2, 32, *size)
    block(x).backward(grad)
    fast = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    plain(block, x).backward(grad)
    slow = [x.grad] + [p.grad for p in block.parameters()]
    for (name, _), a, b in zip([("x", None), *block.named_parameters()], fast, slow):
        assert_close_to_scale(a, b, msg=name)


def test_drop_path_draws_the_same_samples():
    block = make_block(drop_path=0.5).train()
    x = torch.randn(8, 32, 7, 7)
    out = check_drop_path_samples(block, x, plain, seed=1)
    assert not torch.allclose(out, block(x))  # a fresh draw differs


def test_residual_add_helper_matches_unfused_formula():
    x, y, gamma = torch.randn(4, 3, 3, 8), torch.randn(4, 3, 3, 8), torch.randn(8)
    for module in (torch.nn.Identity(), DropPath(0.3).train(), DropPath(0.3).eval(), DropPath(0.0).train()):
        for g in (gamma, None):
            torch.manual_seed(5)
            expected = x + module(scale(y, g))
            torch.manual_seed(5)
            torch.testing.assert_close(residual_add(x, y, g, module), expected, atol=1e-6, rtol=1e-6)


def test_models_match_plain_path():
    """Whole models (a classifier and a dense backbone at a non-square size): fast path against plain."""
    check_models_match("unified_convnext_micro", plain, image_size=64, tol=1e-5)


def test_trace_sees_the_plain_ops():
    """Traced graphs (fvcore FLOP counts, export) take the plain formulation: no custom autograd ops."""
    kinds = traced_op_kinds(make_block().eval(), torch.randn(1, 32, 9, 9))
    assert "prim::PythonOp" not in kinds and "aten::_convolution" in kinds and "aten::linear" in kinds


# ----------------------------------------------------------------------------------- depth-wise weight gradient
@pytest.mark.parametrize("size, kernel", [((14, 14), 7), ((9, 13), 7), ((5, 3), 3), ((2, 2), 7), ((1, 1), 7)])
def test_depthwise_weight_grad_matches_autograd(size, kernel):
    x = torch.randn(3, 6, *size, dtype=torch.float64)
    grad = torch.randn(3, 6, *size, dtype=torch.float64)
    weight = torch.randn(6, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    out = F.conv2d(x, weight, None, padding=kernel // 2, groups=6)
    expected = torch.autograd.grad(out, weight, grad)[0]
    fast = depthwise_weight_grad(x, grad, kernel, kernel // 2)
    torch.testing.assert_close(fast, expected, atol=1e-10, rtol=1e-10)
    cl = depthwise_weight_grad(x.float().contiguous(memory_format=torch.channels_last),
                               grad.float().contiguous(memory_format=torch.channels_last), kernel, kernel // 2)
    assert cl.dtype == torch.float32
    torch.testing.assert_close(cl.double(), expected, atol=1e-4, rtol=1e-4)
    half = depthwise_weight_grad(x.bfloat16(), grad.bfloat16(), kernel, kernel // 2)
    assert half.dtype == torch.float32  # the batch is summed in float32


def test_depthwise_conv_function_gradients_and_autocast():
    conv = torch.nn.Conv2d(8, 8, 7, padding=3, groups=8)
    x = torch.randn(2, 8, 10, 12).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    grad = torch.randn(2, 8, 10, 12)
    out = _DepthwiseConv2d.apply(x, conv.weight, conv.bias, 3)
    torch.testing.assert_close(out, conv(x), atol=1e-6, rtol=1e-6)
    fast = torch.autograd.grad(out, (x, conv.weight, conv.bias), grad)
    slow = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad)
    for a, b in zip(fast, slow):
        assert_close_to_scale(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _DepthwiseConv2d.apply(x, conv.weight, conv.bias, 3)
        expected = conv(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    fast = torch.autograd.grad(out.float(), (x, conv.weight, conv.bias), grad)
    slow = torch.autograd.grad(expected.float(), (x, conv.weight, conv.bias), grad)
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0.05 * float(b.abs().max()), rtol=0.02)


def test_depthwise_conv_runs_other_convolutions_as_they_are():
    x = torch.randn(1, 4, 9, 9, requires_grad=True)
    for conv in (torch.nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
                 torch.nn.Conv2d(4, 4, (3, 5), padding=(1, 2), groups=4),
                 torch.nn.Conv2d(4, 4, 3, padding="same", groups=4)):
        out = depthwise_conv(conv, x)
        assert "Depthwise" not in out.grad_fn.name() and torch.equal(out, conv(x))
    conv = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    assert "Depthwise" in depthwise_conv(conv, x).grad_fn.name()


def test_bf16_autocast_training_step_close_to_float32():
    model = timm.create_model("unified_convnext_micro", num_classes=5, drop_path_rate=0.0).train()
    image = torch.randn(2, 3, 64, 64)
    model(image).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image)
    out.float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
    dw = "stages.2.0.dwconv.weight"
    cosine = F.cosine_similarity(model.get_parameter(dw).grad.flatten(), reference[dw].flatten(), dim=0)
    assert cosine > 0.98
