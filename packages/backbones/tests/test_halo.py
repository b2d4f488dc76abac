"""U-HaloNet block and models against an explicit per-pixel neighbourhood attention written here (spec §2.2, §5)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import stm_backbones
from stm_backbones.fast_paths import fast_paths
from stm_backbones.models.halo import HaloAttn, UnifiedHaloBlock, make_divisible

BS, HALO, WIN = 7, 3, 13


def randomise(module, table_std=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.normal_(0, table_std if "_rel" in name else 0.3)
    return module


@pytest.fixture(params=["fast", "plain"])
def path(request):
    """Run a test on the fast path and on the plain formulation (`fast_paths(False)`)."""
    with fast_paths(request.param == "fast"):
        yield request.param


def make_block(dim=16, heads=2, dense=False, layer_scale=0.5):
    block = UnifiedHaloBlock(dim=dim, stage=0, num_heads=(heads,), layer_scale_init_value=layer_scale, dense=dense)
    return randomise(block).double().eval()


# ----------------------------------------------------------------------------------- naive reference
def naive_halo_before_proj(attn, x):
    """x: (B, H, W, C) with H, W multiples of 7. For every query pixel, gather the 13x13 window around its
    7x7 block (zero outside the map), fill logits of outside keys with -finfo.max, add relative logits."""
    batch, height, width, _ = x.shape
    heads, d = attn.num_heads, attn.dim_head_qk
    q_all = x @ attn.q.weight.T
    kv_all = x @ attn.kv.weight[:, :, 0, 0].T  # per head: [k (d) | v (d)]
    height_rel, width_rel = attn.pos_embed.height_rel, attn.pos_embed.width_rel
    fill = -torch.finfo(x.dtype).max
    out = torch.zeros(batch, height, width, heads * d, dtype=x.dtype)
    for b in range(batch):
        for by in range(height // BS):
            for bx in range(width // BS):
                keys, outside = [], []
                for ky in range(WIN):
                    for kx in range(WIN):
                        r, c = by * BS - HALO + ky, bx * BS - HALO + kx
                        inside = 0 <= r < height and 0 <= c < width
                        outside.append(not inside)
                        keys.append(kv_all[b, r, c] if inside else torch.zeros(2 * heads * d, dtype=x.dtype))
                keys = torch.stack(keys)  # (169, 2·heads·d)
                outside = torch.tensor(outside)
                for qy in range(BS):
                    for qx in range(BS):
                        y, xx = by * BS + qy, bx * BS + qx
                        rows_h = torch.tensor([WIN - 1 + ky - qy for ky in range(WIN) for kx in range(WIN)])
                        rows_w = torch.tensor([WIN - 1 + kx - qx for ky in range(WIN) for kx in range(WIN)])
                        for h in range(heads):
                            q = q_all[b, y, xx, h * d:(h + 1) * d]
                            k = keys[:, 2 * h * d:2 * h * d + d]
                            v = keys[:, 2 * h * d + d:2 * (h + 1) * d]
                            logits = k @ (q * d ** -0.5) + height_rel[rows_h] @ q + width_rel[rows_w] @ q
                            logits = torch.where(outside, torch.full_like(logits, fill), logits)
                            out[b, y, xx, h * d:(h + 1) * d] = logits.softmax(-1) @ v
    return out


def naive_block(block, x, dense=False):
    """x NHWC. Dense: pad the normalised map right/bottom to multiples of 7, crop before proj."""
    height, width = x.shape[1:3]
    u = F.layer_norm(x, x.shape[-1:], block.norm1.weight, block.norm1.bias, eps=1e-5)
    if dense:
        u = F.pad(u, (0, 0, 0, (-width) % BS, 0, (-height) % BS))
    y = naive_halo_before_proj(block.attn, u)[:, :height, :width] @ block.attn.proj.weight.T + block.attn.proj.bias
    gamma_1 = block.gamma_1 if block.gamma_1 is not None else 1.0
    gamma_2 = block.gamma_2 if block.gamma_2 is not None else 1.0
    x = x + gamma_1 * y
    z = F.layer_norm(x, x.shape[-1:], block.norm2.weight, block.norm2.bias, eps=1e-5)
    return x + gamma_2 * (F.gelu(z @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T
                          + block.mlp.fc2.bias)


# ----------------------------------------------------------------------------------- parameters
def test_keys_shapes_and_head_dims():
    block = UnifiedHaloBlock(dim=128, stage=2, num_heads=(1, 2, 4, 8))
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == {
        "gamma_1": (1, 1, 1, 128), "gamma_2": (1, 1, 1, 128), "norm1.weight": (128,), "norm1.bias": (128,),
        "attn.kv.weight": (256, 128, 1, 1), "attn.q.weight": (128, 128), "attn.pos_embed.height_rel": (25, 32),
        "attn.pos_embed.width_rel": (25, 32), "attn.proj.weight": (128, 128), "attn.proj.bias": (128,),
        "norm2.weight": (128,), "norm2.bias": (128,), "mlp.fc1.weight": (512, 128), "mlp.fc1.bias": (512,),
        "mlp.fc2.weight": (128, 512), "mlp.fc2.bias": (128,)}
    assert block.attn.scale == 32 ** -0.5 and block.norm1.eps == block.norm2.eps == 1e-5
    assert [make_divisible(v) for v in (32, 96, 100, 3, 17, 9)] == [32, 96, 104, 8, 16, 16]  # +8 when < 0.9·v


# ----------------------------------------------------------------------------------- forward math
@pytest.mark.parametrize("dim, heads, size", [(16, 2, (14, 21)), (64, 2, (7, 7)), (8, 1, (21, 14))])
def test_attention_matches_explicit_neighbourhoods(dim, heads, size, path):
    attn = randomise(HaloAttn(dim, heads)).double()
    x = torch.randn(2, *size, dim, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_halo_before_proj(attn, x) @ attn.proj.weight.T + attn.proj.bias
        torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=1e-10)


def test_block_matches_naive_float32_and_gamma(path):
    block = make_block().float()
    x = torch.randn(1, 14, 14, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_block(block, x), atol=1e-5, rtol=1e-5)


def test_block_matches_naive_double(path):
    block = make_block()
    x = torch.randn(2, 7, 14, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_block(block, x), atol=1e-10, rtol=1e-10)


def test_outside_keys_get_no_weight_even_with_huge_logits(path):
    """Relative logits of order 1e4 would leak weight to outside keys through a moderate additive mask
    (e.g. -1e4); the -finfo.max fill keeps them at exactly zero weight, as in the naive version."""
    attn = randomise(HaloAttn(16, 2), table_std=3000.0).double()
    x = torch.randn(1, 7, 7, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_halo_before_proj(attn, x) @ attn.proj.weight.T + attn.proj.bias
        torch.testing.assert_close(attn(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("size", [(10, 12), (3, 16), (14, 8)])
def test_dense_block_pads_before_projections_and_crops_before_proj(size, path):
    block = make_block(dense=True)
    x = torch.randn(2, *size, 16, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        expected = naive_block(block, x, dense=True)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_dense_equals_classification_at_multiples_of_7(path):
    cls_block, dense_block = make_block(), make_block(dense=True)
    dense_block.load_state_dict(cls_block.state_dict())
    x = torch.randn(1, 14, 21, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense_block(x), cls_block(x), atol=0, rtol=0)
        with pytest.raises(ValueError, match="multiples of the block size 7"):
            cls_block(torch.randn(1, 10, 14, 16, dtype=torch.float64))


def test_layer_scale_semantics():
    block = UnifiedHaloBlock(dim=16, num_heads=(2,), layer_scale_init_value=0.25)
    assert torch.all(block.gamma_1 == 0.25) and torch.all(block.gamma_2 == 0.25)
    plain = UnifiedHaloBlock(dim=16, num_heads=(2,), layer_scale_init_value=-1)
    assert plain.gamma_1 is None and not any("gamma" in k for k in plain.state_dict())
    unit = UnifiedHaloBlock(dim=16, num_heads=(2,), layer_scale_init_value=1.0)
    unit.load_state_dict({**plain.state_dict(), "gamma_1": torch.ones(1, 1, 1, 16), "gamma_2": torch.ones(1, 1, 1, 16)})
    x = torch.randn(1, 7, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unit(x))
    assert torch.all(timm.create_model("unified_halo_micro").stages[1][0].gamma_1 == 1e-6)


def test_mask_is_cached_off_the_state_dict_and_follows_dtype(path):
    block = make_block()
    x = torch.randn(1, 14, 14, 16, dtype=torch.float64)
    with torch.no_grad():
        block(x)
        block(x)
    entries = block.attn._masks.entries
    assert list(entries) == [(14, 14, x.device)]
    mask = entries[(14, 14, x.device)]
    assert mask.dtype == torch.bool and mask.shape == (1, 4, 1, WIN * WIN)
    assert int((~mask[0, 0, 0]).sum()) == 10 * 10  # top-left block: keys inside rows/cols 0..9
    assert not any("mask" in k for k in block.state_dict()) and not any("mask" in n for n, _ in block.named_buffers())


# ----------------------------------------------------------------------------------- input sizes and models
def test_input_size_error_messages():
    rule = UnifiedHaloBlock.input_size_error
    for size in ((224, 224), (448, 224), (221, 224), (672, 448)):
        assert rule(*size, (224, 224), False) is None
    assert rule(96, 160, (224, 224), True) is None
    message = rule(256, 256, (224, 224), False)
    assert "multiple of the block size 7" in message and "64x64, 32x32, 16x16, 8x8" in message
    assert "448x448" in message and "create_dense_backbone" in message
    assert "224x224" in rule(96, 160, (224, 224), False)
    model = timm.create_model("unified_halo_micro", num_classes=4).eval()
    with pytest.raises(ValueError, match="UnifiedHaloBlock: every stage resolution"):
        model(torch.randn(1, 3, 256, 256))


def test_classifier_features_and_dense_backbone():
    with torch.no_grad():
        model = timm.create_model("unified_halo_micro", num_classes=4).eval()
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 4)
        features = timm.create_model("unified_halo_micro", features_only=True).eval()
        outs = features(torch.randn(1, 3, 224, 224))
        assert [tuple(o.shape[1:]) for o in outs] == [(32, 56, 56), (64, 28, 28), (128, 14, 14), (256, 7, 7)]
        dense = stm_backbones.create_dense_backbone("unified_halo_micro").eval()
        maps = dense(torch.randn(1, 3, 96, 160))
        assert [tuple(m.shape[1:]) for m in maps] == [(32, 24, 40), (64, 12, 20), (128, 6, 10), (256, 3, 5)]
        assert all(torch.isfinite(m).all() for m in maps)


def test_pretrained_cfg_names_the_study_file():
    cfg = timm.create_model("unified_halo_base", num_classes=0, depths=(1, 1, 1, 1)).pretrained_cfg
    assert "study_filename=unified_halonet_base.pth" in cfg["notes"]


# ----------------------------------------------------------------------------------- family policies
def test_position_tables_and_weight_decay_policy():
    model = timm.create_model("unified_halo_micro", num_classes=4)
    tables = model.position_tables()
    assert tables == {n for n, _ in model.named_parameters() if n.endswith(("height_rel", "width_rel"))}
    assert len(tables) == 2 * sum(model.depths) and model.no_weight_decay() == set()


def test_adapt_checkpoint_tensor_resizes_the_tables_only():
    target = torch.zeros(25, 8)
    ramp = torch.linspace(-1, 1, 13)[:, None] * torch.arange(1, 9, dtype=torch.float32)
    resized = UnifiedHaloBlock.adapt_checkpoint_tensor("attn.pos_embed.width_rel", ramp, target)
    torch.testing.assert_close(resized, torch.linspace(-1, 1, 25)[:, None] * torch.arange(1, 9, dtype=torch.float32))
    assert UnifiedHaloBlock.adapt_checkpoint_tensor("attn.pos_embed.height_rel", target, target) is target
    other = torch.randn(13, 8)
    assert UnifiedHaloBlock.adapt_checkpoint_tensor("attn.q.weight", other, target) is other
