"""U-PVT / PVT-v2 blocks and models against naive formulas written out independently here (spec §2.3, §4, §5).

The forward-math tests run both the blocks' plain formulation and their fast path (`paths` fixture)."""

import math

import pytest
import timm
import torch
from bb_test_utils import linear, naive_gelu, naive_ln

import stm_backbones
from stm_backbones import fast_paths
from stm_backbones.models.pvt import OverlapPatchEmbed, PvtBlock, PvtV2Block

DIM, HEADS = 8, 2


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def paths(request):
    """Runs the test with the blocks' fast paths on, then off (the plain formulation)."""
    with fast_paths.fast_paths(request.param):
        yield request.param


def randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def make_block(cls=PvtBlock, depth=0, resolution=(8, 8), sr=2, dense=False, mlp_ratio=2, layer_scale=0.5):
    block = cls(dim=DIM, stage=0, depth=depth, input_resolution=resolution, layer_scale_init_value=layer_scale,
                dense=dense, num_heads=(HEADS,), sr_ratios=(sr,), mlp_ratios=(mlp_ratio,))
    return randomise(block.double().eval())


# ----------------------------------------------------------------------------------- naive reference
def to_tokens(x):  # (B, C, H, W) -> (B, H*W, C), pixel (y, x) at token y*W + x
    batch, channels, height, width = x.shape
    return torch.stack([x[:, :, i // width, i % width] for i in range(height * width)], dim=1)


def from_tokens(t, height, width):
    out = torch.zeros(t.shape[0], t.shape[2], height, width, dtype=t.dtype)
    for i in range(height * width):
        out[:, :, i // width, i % width] = t[:, i]
    return out


def naive_sra(attn, y, height, width):
    """Spatial-reduction attention with explicit per-patch sr conv and per-query softmax."""
    batch, tokens, channels = y.shape
    heads, sr = attn.num_heads, attn.sr_ratio
    d = channels // heads
    q = linear(y, attn.q)
    if sr > 1:
        grid = from_tokens(y, height, width)  # (B, C, H, W)
        kernel = attn.sr.weight.reshape(channels, -1)  # (C_out, C_in*sr*sr), order (c_in, ky, kx)
        reduced = []
        for i in range(height // sr):
            for j in range(width // sr):
                patch = grid[:, :, i * sr:(i + 1) * sr, j * sr:(j + 1) * sr].reshape(batch, -1)
                reduced.append(patch @ kernel.T + attn.sr.bias)
        z = naive_ln(torch.stack(reduced, dim=1), attn.norm)
    else:
        z = y
    kv = linear(z, attn.kv)
    k, v = kv[..., :channels], kv[..., channels:]
    out = torch.zeros_like(q)
    for b in range(batch):
        for n in range(tokens):
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                logits = torch.stack([(q[b, n, sl] * k[b, m, sl]).sum() for m in range(k.shape[1])]) * d ** -0.5
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[b, n, sl] = (weights[:, None] * v[b, :, sl]).sum(0)
    return linear(out, attn.proj)


def naive_bilinear_align_corners(image, out_h, out_w):
    """(1, C, H, W) -> (1, C, out_h, out_w): source coordinate i·(H-1)/(out_h-1), bilinear."""
    _, channels, height, width = image.shape
    out = torch.zeros(1, channels, out_h, out_w, dtype=image.dtype)
    for i in range(out_h):
        sy = i * (height - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(math.floor(sy)), height - 1)
        y1, fy = min(y0 + 1, height - 1), sy - y0
        for j in range(out_w):
            sx = j * (width - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(math.floor(sx)), width - 1)
            x1, fx = min(x0 + 1, width - 1), sx - x0
            out[0, :, i, j] = ((1 - fy) * (1 - fx) * image[0, :, y0, x0] + (1 - fy) * fx * image[0, :, y0, x1]
                               + fy * (1 - fx) * image[0, :, y1, x0] + fy * fx * image[0, :, y1, x1])
    return out


def naive_mlp(block, t):
    return linear(naive_gelu(linear(naive_ln(t, block.norm2), block.mlp.fc1)), block.mlp.fc2)


def naive_pvt_block(block, x, dense):
    batch, channels, height, width = x.shape
    if dense:
        identity = to_tokens(x)
        if block.pos_embed is not None:
            x = x + naive_bilinear_align_corners(block.pos_embed, height, width)
        t = identity + block.gamma_1 * naive_sra(block.attn, naive_ln(to_tokens(x), block.norm1), height, width)
    else:
        if block.pos_embed is not None:
            x = x + block.pos_embed  # included in the residual
        t = to_tokens(x)
        t = t + block.gamma_1 * naive_sra(block.attn, naive_ln(t, block.norm1), height, width)
    t = t + block.gamma_2 * naive_mlp(block, t)
    return from_tokens(t, height, width)


# ----------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("sr", [1, 2, 4])
def test_sra_matches_naive_attention(sr, paths):
    block = make_block(sr=sr)
    y = torch.randn(2, 64, DIM, dtype=torch.float64)
    torch.testing.assert_close(block.attn(y, 8, 8), naive_sra(block.attn, y, 8, 8), rtol=1e-10, atol=1e-10)


def test_sra_keys_only_when_reducing():
    assert {k for k in make_block(sr=2).attn.state_dict()} == {
        "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias", "sr.weight", "sr.bias",
        "norm.weight", "norm.bias"}
    assert {k.split(".")[0] for k in make_block(sr=1).attn.state_dict()} == {"q", "kv", "proj"}


@pytest.mark.parametrize("depth", [0, 1])
def test_classification_block_matches_naive(depth, paths):
    block = make_block(depth=depth, resolution=(8, 4))
    assert (block.pos_embed is not None) == (depth == 0)
    if depth == 0:
        assert tuple(block.pos_embed.shape) == (1, DIM, 8, 4)
    x = torch.randn(2, DIM, 8, 4, dtype=torch.float64)
    torch.testing.assert_close(block(x), naive_pvt_block(block, x, dense=False), rtol=1e-10, atol=1e-10)


def test_classification_pos_embed_is_inside_the_residual(paths):
    """With both branches switched off the block returns x + pos_embed (the residual carries it)."""
    block = make_block(layer_scale=0.5)
    with torch.no_grad():
        block.gamma_1.zero_()
        block.gamma_2.zero_()
    x = torch.randn(1, DIM, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), x + block.pos_embed, rtol=0, atol=1e-12)


def test_classification_block_rejects_other_resolution(paths):
    with pytest.raises(ValueError, match="8x8"):
        make_block(resolution=(8, 8))(torch.randn(1, DIM, 4, 8, dtype=torch.float64))


@pytest.mark.parametrize("size", [(8, 8), (4, 6), (12, 8)])
def test_dense_block_matches_naive(size, paths):
    block = make_block(dense=True, resolution=(8, 8))
    x = torch.randn(2, DIM, *size, dtype=torch.float64)
    torch.testing.assert_close(block(x), naive_pvt_block(block, x, dense=True), rtol=1e-10, atol=1e-10)


def test_dense_residual_excludes_pos_embed(paths):
    block = make_block(dense=True)
    with torch.no_grad():
        block.gamma_1.zero_()
        block.gamma_2.zero_()
    x = torch.randn(1, DIM, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)


def test_dense_block_without_pos_embed_equals_classification_block():
    cls_block = make_block(depth=1)
    dense_block = make_block(depth=1, dense=True)
    dense_block.load_state_dict(cls_block.state_dict())
    x = torch.randn(1, DIM, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(dense_block(x), cls_block(x), rtol=0, atol=0)


def test_no_layer_scale_means_no_gamma():
    block = PvtBlock(dim=DIM, input_resolution=(8, 8), layer_scale_init_value=0, num_heads=(HEADS,),
                     sr_ratios=(2,), mlp_ratios=(2,))
    assert not any("gamma" in k for k in block.state_dict())
    assert block(torch.randn(1, DIM, 8, 8)).shape == (1, DIM, 8, 8)


# ----------------------------------------------------------------------------------- PVT-v2
def naive_dwconv3x3(t, conv, height, width):
    """Depth-wise 3x3 conv, zero padding 1, on tokens seen as a (C, H, W) grid, by explicit sums."""
    grid = from_tokens(t, height, width)
    batch, channels = grid.shape[:2]
    padded = torch.zeros(batch, channels, height + 2, width + 2, dtype=t.dtype)
    padded[:, :, 1:-1, 1:-1] = grid
    out = conv.bias[None, :, None, None].expand(batch, channels, height, width).clone()
    for ky in range(3):
        for kx in range(3):
            out = out + conv.weight[None, :, 0, ky, kx, None, None] * padded[:, :, ky:ky + height, kx:kx + width]
    return to_tokens(out)


def test_pvt_v2_mlp_has_dwconv_between_fc1_and_gelu():
    block = make_block(PvtV2Block, resolution=(6, 5))
    t = torch.randn(2, 30, DIM, dtype=torch.float64)
    mlp = block.mlp
    expected = linear(naive_gelu(naive_dwconv3x3(linear(t, mlp.fc1), mlp.dwconv.dwconv, 6, 5)), mlp.fc2)
    torch.testing.assert_close(mlp(t, 6, 5), expected, rtol=1e-10, atol=1e-10)
    assert tuple(mlp.dwconv.dwconv.weight.shape) == (2 * DIM, 1, 3, 3)


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_pvt_v2_block_matches_naive(size, paths):
    block = make_block(PvtV2Block)
    assert block.pos_embed is None and not any("pos_embed" in k for k in block.state_dict())
    height, width = size
    x = torch.randn(2, DIM, height, width, dtype=torch.float64)
    t = to_tokens(x)
    t = t + block.gamma_1 * naive_sra(block.attn, naive_ln(t, block.norm1), height, width)
    mlp = block.mlp
    hidden = naive_dwconv3x3(linear(naive_ln(t, block.norm2), mlp.fc1), mlp.dwconv.dwconv, height, width)
    t = t + block.gamma_2 * linear(naive_gelu(hidden), mlp.fc2)
    torch.testing.assert_close(block(x), from_tokens(t, height, width), rtol=1e-10, atol=1e-10)


def test_overlap_patch_embed_stem():
    stem = OverlapPatchEmbed(in_channels=3, out_channels=8)
    assert tuple(stem.proj.weight.shape) == (8, 3, 7, 7) and stem.proj.stride == (4, 4)
    assert stem(torch.randn(1, 3, 30, 33)).shape == (1, 8, 8, 9)  # ceil(H / 4)


# ----------------------------------------------------------------------------------- models
def test_model_layout():
    with torch.device("meta"):
        model = timm.create_model("unified_pvt_micro")
    keys = model.state_dict().keys()
    assert sorted(k for k in keys if "pos_embed" in k) == [f"stages.{i}.0.pos_embed" for i in range(4)]
    assert not any(k.startswith("stages.3.") and (".attn.sr." in k or ".attn.norm." in k) for k in keys)
    assert model.pretrained_cfg["fixed_input_size"]
    with torch.device("meta"):
        b0 = timm.create_model("official_pvt_v2_b0")
    assert isinstance(b0.conv_head, torch.nn.Identity) and b0.head.in_features == 256


def test_classifier_input_size_error_names_img_size():
    model = timm.create_model("unified_pvt_micro", num_classes=0)
    with pytest.raises(ValueError, match=r"224x224.*img_size=256"):
        model(torch.randn(1, 3, 256, 256))
    non_square = timm.create_model("unified_pvt_micro", num_classes=0, img_size=(96, 160)).eval()
    assert non_square(torch.randn(1, 3, 96, 160)).shape == (1, 384)


def test_pos_embed_resized_on_load():
    small = timm.create_model("unified_pvt_micro", num_classes=0, img_size=64)
    large = timm.create_model("unified_pvt_micro", num_classes=0, img_size=96)
    large.load_state_dict(small.state_dict())
    for i in range(4):
        source = small.stages[i][0].pos_embed.detach().double()
        target = large.stages[i][0].pos_embed.detach().double()
        expected = naive_bilinear_align_corners(source, *target.shape[-2:])
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)


def test_input_size_errors():
    assert PvtBlock.input_size_error(224, 224, (224, 224), False) is None
    message = PvtBlock.input_size_error(256, 320, (224, 224), False)
    assert "built for 224x224 inputs" in message and "img_size=(256, 320)" in message
    assert "multiples of 32" in PvtBlock.input_size_error(100, 100, (224, 224), False)
    assert PvtBlock.input_size_error(96, 160, (224, 224), True) is None  # dense: the pos-embed is resized
    for block in (PvtBlock, PvtV2Block):  # a 16x16 input gives a 4x4 stage 0, smaller than its ratio 8
        assert "spatial-reduction ratios" in block.input_size_error(16, 16, (16, 16), True)


def test_family_policies():
    model = timm.create_model("unified_pvt_micro", num_classes=0)
    assert model.position_tables() == {f"stages.{i}.0.pos_embed" for i in range(4)}
    assert model.no_weight_decay() == set()
    v2 = timm.create_model("unified_pvt_v2_micro", num_classes=0)
    assert v2.position_tables() == set() and PvtV2Block.derived_buffers == ()
    plane = torch.arange(6.0).view(1, 1, 2, 3)  # affine in (y, x): bilinear with aligned corners keeps it
    resized = PvtBlock.adapt_checkpoint_tensor("pos_embed", plane, torch.zeros(1, 1, 3, 5))
    expected = 3 * torch.linspace(0, 1, 3)[:, None] + 2 * torch.linspace(0, 1, 5)
    torch.testing.assert_close(resized, expected[None, None])
    other = torch.randn(2, 2)
    assert PvtBlock.adapt_checkpoint_tensor("attn.q.weight", other, torch.zeros(3, 3)) is other
    assert PvtV2Block.adapt_checkpoint_tensor("pos_embed", plane, torch.zeros(1, 1, 3, 5)) is plane


def test_registered_families():
    pvt, v2 = stm_backbones.get_family("pvt"), stm_backbones.get_family("pvt_v2")
    assert pvt.study and not v2.study and pvt.block_type is PvtBlock and v2.block_type is PvtV2Block
    assert pvt.models() == [f"unified_pvt_{s}" for s in ("micro", "tiny", "small", "base")]
    assert v2.model_args("tiny")["depths"] == (3, 3, 9, 3) and pvt.model_args("tiny")["depths"] == (3, 4, 9, 3)
    with torch.device("meta"):
        cfg = timm.create_model("unified_pvt_v2_micro").pretrained_cfg
    assert not cfg.get("fixed_input_size") and not cfg.get("notes")
