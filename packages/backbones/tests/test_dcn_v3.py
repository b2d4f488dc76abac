"""U-InternImage (DCNv3) block, its sampling op and hooks against naive formulas written out here (spec §2.5,
deformable_op.md §2, §5, §6)."""

import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from bb_test_utils import linear, naive_gelu, naive_ln

import stm_cuda_ops
from stm_backbones import fast_paths, ops
from stm_backbones.models.dcn_v3 import DCNv3Block, DeformableAttention, kernel_grid

DIM, HEADS, P = 8, 2, 9


@pytest.fixture
def pure_pytorch_op():
    """Force stm_cuda_ops' pure-PyTorch reference (the fallback when its extension is not built), without
    the fallback's warning."""
    with stm_cuda_ops.use_reference():
        yield


@pytest.fixture(params=["fast", "plain"])
def path(request):
    """Run a test through the block's fast path and through its plain formulation."""
    with fast_paths.fast_paths(request.param == "fast"):
        yield request.param


def stage_inputs(height, width):
    """The block's extra inputs for a (height, width) stage-0 map: an image of 4x that size."""
    return DCNv3Block.extra_inputs(torch.empty(1, 3, 4 * height, 4 * width))[0]


def make_attention(offset_std=1.5):
    attn = DeformableAttention(DIM, HEADS).double()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.normal_(0, offset_std if "sampling_offsets" in name else 0.4)
    return attn


# ----------------------------------------------------------------------------------- naive reference
def bilinear_zero_outside(image, px, py):
    """image (H, W, D); continuous pixel-centre coords; corners outside the image count as 0."""
    height, width = image.shape[:2]
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    out = torch.zeros(image.shape[-1], dtype=image.dtype)
    for yy, xx, w in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                      (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
        if 0 <= yy < height and 0 <= xx < width:
            out = out + w * image[yy, xx]
    return out


def naive_deformable_attention(attn, u):
    """Per query pixel, head and point: sample the (unpadded) projected values at (x + dx + ox, y + dy + oy)."""
    batch, height, width, channels = u.shape
    heads, d = attn.num_heads, channels // attn.num_heads
    # depth-wise 3x3 conv branch (zero padding 1), channels-last LN, GELU
    conv = attn.dw_conv[0]
    padded = F.pad(u, (0, 0, 1, 1, 1, 1))
    branch = conv.bias.expand(batch, height, width, channels).clone()
    for ky in range(3):
        for kx in range(3):
            branch = branch + conv.weight[:, 0, ky, kx] * padded[:, ky:ky + height, kx:kx + width]
    branch = naive_gelu(naive_ln(branch, attn.dw_conv[1].norm))
    offsets = linear(branch, attn.sampling_offsets)  # channel (head * P + p) * 2 + t, t = 0 -> x
    logits = linear(branch, attn.attention_weights)  # channel head * P + p
    value = linear(u, attn.value_proj)  # the value comes from u itself, no padding here
    out = torch.zeros(batch, height, width, channels, dtype=u.dtype)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                for h in range(heads):
                    w = torch.exp(logits[b, y, x, h * P:(h + 1) * P])
                    w = w / w.sum()
                    acc = torch.zeros(d, dtype=u.dtype)
                    for p in range(P):
                        dx, dy = p // 3 - 1, p % 3 - 1  # the transposed (column-major) kernel enumeration
                        ox = offsets[b, y, x, (h * P + p) * 2].item()
                        oy = offsets[b, y, x, (h * P + p) * 2 + 1].item()
                        acc = acc + w[p] * bilinear_zero_outside(value[b, :, :, h * d:(h + 1) * d],
                                                                 x + dx + ox, y + dy + oy)
                    out[b, y, x, h * d:(h + 1) * d] = acc
    return linear(out, attn.output_proj)


def naive_grid_sample_msda(value, shapes, locations, weights):
    """deformable_op.md §5 written out per level and head with grid_sample (independent of the op's code)."""
    batch, _, heads, d = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads * d, dtype=value.dtype)
    start = 0
    for level, (height, width) in enumerate(shapes):
        for h in range(heads):
            image = value[:, start:start + height * width, h].reshape(batch, height, width, d).permute(0, 3, 1, 2)
            grid = 2 * locations[:, :, h, level] - 1  # (B, Lq, P, 2), (x, y)
            sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[:, :, h * d:(h + 1) * d] += (sampled * weights[:, None, :, h, level]).sum(-1).transpose(1, 2)
        start += height * width
    return out


# ----------------------------------------------------------------------------------- grid and hook
def test_kernel_grid_is_transposed():
    grid = kernel_grid(P, HEADS)
    assert grid.shape == (1, 1, HEADS, 1, P, 2) and grid.dtype == torch.float32
    for h in range(HEADS):
        assert grid[0, 0, h, 0, :, 0].tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1]  # added to x
        assert grid[0, 0, h, 0, :, 1].tolist() == [-1, 0, 1, -1, 0, 1, -1, 0, 1]  # added to y


def test_grid_is_not_state():
    attn = DeformableAttention(DIM, HEADS)
    assert not any("grid" in k for k in attn.state_dict())
    assert "grid" not in dict(attn.named_buffers())
    block = DCNv3Block(dim=DIM, num_heads=(HEADS,))
    assert [k for k in block.state_dict() if "." not in k] == ["gamma1", "gamma2"]  # no underscore


@pytest.mark.parametrize("image_size", [(64, 96), (100, 70)])
def test_extra_inputs_values(image_size):
    image_h, image_w = image_size
    extra = DCNv3Block.extra_inputs(torch.empty(2, 3, image_h, image_w))
    assert len(extra) == 4
    for i, (ref, shapes, start, hw) in enumerate(extra):
        h, w = image_h // 2 ** (i + 2), image_w // 2 ** (i + 2)  # floor of the image size
        hp, wp = h + 2, w + 2
        assert hw == (h, w)
        assert shapes.dtype == torch.int64 and shapes.tolist() == [[hp, wp]]
        assert start.dtype == torch.int64 and start.tolist() == [0]
        assert ref.dtype == torch.float32 and ref.shape == (1, h * w, 1, 2)
        for n in (0, 1, w, h * w - 1):
            y, x = divmod(n, w)
            expected_x = torch.tensor(x + 1.5, dtype=torch.float32) / torch.tensor(wp, dtype=torch.float32)
            expected_y = torch.tensor(y + 1.5, dtype=torch.float32) / torch.tensor(hp, dtype=torch.float32)
            assert ref[0, n, 0, 0] == expected_x and ref[0, n, 0, 1] == expected_y


def test_input_size_rule():
    assert DCNv3Block.input_size_error(224, 160, 224, False) is None
    assert "multiples of 32" in DCNv3Block.input_size_error(224, 100, 224, False)
    model = timm.create_model("unified_dcn_v3_micro", num_classes=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 80))


# ----------------------------------------------------------------------------------- sampling
def test_attention_matches_per_pixel_loop(op_backend, path):
    attn = make_attention()
    u = torch.randn(2, 5, 6, DIM, dtype=torch.float64)
    expected = naive_deformable_attention(attn, u)
    # the float32 reference points cost ~1e-7 of a pixel in the normalise/denormalise round trip
    torch.testing.assert_close(attn(u, stage_inputs(5, 6)), expected, rtol=1e-5, atol=1e-5)


def test_samples_outside_the_map_are_zero_not_bias(pure_pytorch_op, path):
    attn = make_attention(offset_std=0.0)
    with torch.no_grad():
        attn.sampling_offsets.bias.fill_(50.0)  # every sample far outside
        attn.value_proj.bias.fill_(3.0)
    u = torch.randn(1, 3, 4, DIM, dtype=torch.float64)
    out = attn(u, stage_inputs(3, 4))
    torch.testing.assert_close(out, attn.output_proj.bias.expand_as(out), rtol=0, atol=1e-12)


@pytest.mark.parametrize("point", range(P))
def test_point_enumeration_picks_transposed_neighbour(point, op_backend, path):
    """Only point `point` has weight; its offset is (+0.5, 0): the sample lies between two neighbours in x."""
    attn = DeformableAttention(DIM, HEADS).double()
    with torch.no_grad():
        attn.dw_conv[0].weight.normal_()
        attn.value_proj.weight.copy_(torch.eye(DIM))
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.copy_(torch.eye(DIM))
        attn.output_proj.bias.zero_()
        attn.sampling_offsets.weight.zero_()
        bias = torch.randn(HEADS, P, 2, dtype=torch.float64) * 3  # garbage for the other points
        bias[:, point] = torch.tensor([0.5, 0.0], dtype=torch.float64)
        attn.sampling_offsets.bias.copy_(bias.flatten())
        attn.attention_weights.weight.zero_()
        logits = torch.full((HEADS, P), -1e4, dtype=torch.float64)
        logits[:, point] = 0.0
        attn.attention_weights.bias.copy_(logits.flatten())
    height, width = 4, 5
    u = torch.randn(1, height, width, DIM, dtype=torch.float64)
    out = attn(u, stage_inputs(height, width))
    dx, dy = point // 3 - 1, point % 3 - 1

    def at(y, x):
        inside = 0 <= y < height and 0 <= x < width
        return u[0, y, x] if inside else torch.zeros(DIM, dtype=torch.float64)

    for y in range(height):
        for x in range(width):
            expected = 0.5 * at(y + dy, x + dx) + 0.5 * at(y + dy, x + dx + 1)
            torch.testing.assert_close(out[0, y, x], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_op_matches_grid_sample_formulation(op_backend, dtype):
    shapes = [(6, 7), (3, 4)]
    batch, queries, heads, d, points = 3, 10, 2, 4, 5
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, d, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, dtype=dtype)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    start = torch.tensor([0, shapes[0][0] * shapes[0][1]], dtype=torch.int64)
    out = ops.ms_deform_attn(value, spatial_shapes, start, locations, weights)
    assert out.shape == (batch, queries, heads * d) and out.dtype == dtype
    expected = naive_grid_sample_msda(value, shapes, locations, weights)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(stm_cuda_ops.ms_deform_attn_reference(value, spatial_shapes, start, locations, weights,
                                                                     static_shapes=shapes), expected, rtol=tol, atol=tol)


def test_fallback_gradients_match_grid_sample_formulation(pure_pytorch_op):
    shapes = [(5, 6)]
    value = torch.randn(2, 30, 2, 4, dtype=torch.float64, requires_grad=True)
    locations = (torch.rand(2, 7, 2, 1, 9, 2, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(2, 7, 2, 1, 9, dtype=torch.float64, requires_grad=True)
    args = (torch.tensor(shapes), torch.tensor([0]), locations, weights)
    grads = torch.autograd.grad(ops.ms_deform_attn(value, *args).square().sum(), (value, locations, weights))
    expected = torch.autograd.grad(naive_grid_sample_msda(value, shapes, locations, weights).square().sum(),
                                   (value, locations, weights))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_op_runs_in_float32_under_autocast(op_backend):
    value = torch.randn(2, 20, 2, 4).bfloat16()
    locations = torch.rand(2, 6, 2, 1, 9, 2).bfloat16()
    weights = torch.rand(2, 6, 2, 1, 9).bfloat16()
    args = (torch.tensor([[4, 5]]), torch.tensor([0]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.ms_deform_attn(value, *args, locations, weights)
    assert out.dtype == torch.float32
    expected = ops.ms_deform_attn(value.float(), *args, locations.float(), weights.float())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- block and model
def test_block_matches_naive_composition(pure_pytorch_op, path):
    block = DCNv3Block(dim=DIM, num_heads=(HEADS,), layer_scale_init_value=0.5).double().eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 1.0 if "sampling_offsets" in name else 0.3)
    x = torch.randn(2, DIM, 4, 5, dtype=torch.float64)
    extra = stage_inputs(4, 5)
    out, passed = block((x, extra))
    assert passed is extra and out.shape == x.shape
    t = x.permute(0, 2, 3, 1)
    t = t + block.gamma1 * naive_deformable_attention(block.attn, naive_ln(t, block.norm1))
    t = t + block.gamma2 * linear(naive_gelu(linear(naive_ln(t, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    torch.testing.assert_close(out, t.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


def test_no_layer_scale_means_no_gamma():
    block = DCNv3Block(dim=DIM, num_heads=(HEADS,), layer_scale_init_value=0)
    assert not any("gamma" in k for k in block.state_dict())
    out, _ = block((torch.randn(1, DIM, 4, 4), stage_inputs(4, 4)))
    assert out.shape == (1, DIM, 4, 4)


def test_works_without_the_compiled_op_and_warns_once():
    """Without stm_cuda_ops' extension, DCNv3 runs on its pure-PyTorch reference after one warning, which
    says how to build the op."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["stm_cuda_ops._C"] = None  # as if the extension were not built
        import torch
        from stm_backbones import ops
        from stm_backbones.models.dcn_v3 import DCNv3Block
        block = DCNv3Block(dim=8, num_heads=(2,)).eval()
        assert not ops.compiled_op_available()
        extra = DCNv3Block.extra_inputs(torch.empty(1, 3, 16, 16))[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                for _ in range(3):
                    block((torch.randn(1, 8, 4, 4), extra))
        hits = [str(w.message) for w in caught if "stm_cuda_ops" in str(w.message)]
        assert len(hits) == 1 and "nox -s build_ops" in hits[0], hits
        print("fallback ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "fallback ok" in result.stdout, result.stdout + result.stderr


def test_compiled_and_fallback_models_agree():
    if not ops.compiled_op_available():
        pytest.skip("stm_cuda_ops's compiled op is not built")
    model = timm.create_model("unified_dcn_v3_micro", num_classes=10).eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        compiled = model(image)
        with stm_cuda_ops.use_reference():
            fallback = model(image)
    torch.testing.assert_close(compiled, fallback, rtol=1e-5, atol=1e-5)


def test_fallback_is_one_opaque_node_under_jit_trace(pure_pytorch_op):
    """fvcore-style tracing sees the sampling as one node (as the reference's CUDA op), with the same output;
    jit tracing takes the plain (padded) formulation."""
    attn = make_attention().float().eval()
    u = torch.randn(1, 4, 5, DIM)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, u, image):
            return self.attn(u, DCNv3Block.extra_inputs(image)[0])

    image = torch.empty(1, 3, 16, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Wrapper(), (u, image), check_trace=False)
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert "prim::PythonOp" in kinds and "aten::grid_sampler" not in kinds and "aten::pad" in kinds
    torch.testing.assert_close(traced(u, image), attn(u, stage_inputs(4, 5)), rtol=1e-6, atol=1e-6)
