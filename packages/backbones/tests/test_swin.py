"""U-Swin block and models against naive per-window formulas written out independently here (spec §2.4, §5).

The forward-math tests run both the block's plain formulation and its fast path (`paths` fixture)."""

import pytest
import timm
import torch
import torch.nn.functional as F

import stm_backbones
from stm_backbones import fast_paths
from stm_backbones.models.swin import PatchMerging, SwinBlock

DIM, HEADS = 16, 2


@pytest.fixture(params=[True, False], ids=["fast", "plain"])
def paths(request):
    """Runs the test with the blocks' fast paths on, then off (the plain formulation)."""
    with fast_paths.fast_paths(request.param):
        yield request.param


def make_block(resolution, depth, dense=False, layer_scale=0.5, dim=DIM, heads=HEADS):
    block = SwinBlock(dim=dim, stage=0, depth=depth, input_resolution=resolution, num_heads=(heads,),
                      layer_scale_init_value=layer_scale, dense=dense).double().eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(0, 1.0 if "relative_position_bias_table" in name else 0.3)
    return block


# ----------------------------------------------------------------------------------- naive reference
def band(pos, size, window, shift):
    if pos < size - window:
        return 0
    if pos < size - shift:
        return 1
    return 2


def naive_layer_norm(x_nchw, norm, eps):
    mean = x_nchw.mean(dim=1, keepdim=True)
    var = ((x_nchw - mean) ** 2).mean(dim=1, keepdim=True)
    return (x_nchw - mean) / torch.sqrt(var + eps) * norm.weight[:, None, None] + norm.bias[:, None, None]


def naive_window_attention(attn, y, window, shift):
    """y: (B, H, W, C) normalised map, H and W multiples of the window. Loops over windows one by one."""
    batch, height, width, channels = y.shape
    heads = attn.num_heads
    d = channels // heads
    weight, bias = attn.qkv.weight, attn.qkv.bias
    table = attn.relative_position_bias_table
    tokens = window * window
    out = torch.zeros_like(y)
    for b in range(batch):
        for wr in range(height // window):
            for wc in range(width // window):
                # window token t sits at (wr*ws + t//ws, wc*ws + t%ws) of the rolled map, which holds y at +shift
                rolled = [(wr * window + t // window, wc * window + t % window) for t in range(tokens)]
                source = [((r + shift) % height, (c + shift) % width) for r, c in rolled]
                feats = torch.stack([y[b, r, c] for r, c in source])  # (N, C)
                qkv = feats @ weight.T + bias
                heads_out = []
                for h in range(heads):
                    q = qkv[:, h * d:(h + 1) * d]
                    k = qkv[:, channels + h * d:channels + (h + 1) * d]
                    v = qkv[:, 2 * channels + h * d:2 * channels + (h + 1) * d]
                    logits = (q * d ** -0.5) @ k.T
                    index = [[((p // window) - (o // window) + window - 1) * (2 * window - 1)
                              + ((p % window) - (o % window) + window - 1) for o in range(tokens)]
                             for p in range(tokens)]
                    logits = logits + table[torch.tensor(index), h]
                    if shift:
                        labels = [3 * band(r, height, window, shift) + band(c, width, window, shift) for r, c in rolled]
                        mask = torch.tensor([[0.0 if labels[p] == labels[o] else -100.0 for o in range(tokens)]
                                             for p in range(tokens)], dtype=y.dtype)
                        logits = logits + mask
                    heads_out.append(logits.softmax(-1) @ v)
                result = attn.proj(torch.cat(heads_out, dim=-1))
                for t, (r, c) in enumerate(source):  # reverse roll: write back where the token came from
                    out[b, r, c] = result[t]
    return out


def naive_block(block, x, window, shift):
    """Full block on NCHW x: LN2d eps 1e-6, pad right/bottom to the window, attention, crop, γ, MLP."""
    height, width = x.shape[-2:]
    u = naive_layer_norm(x, block.norm1, 1e-6).permute(0, 2, 3, 1)
    u = F.pad(u, (0, 0, 0, (-width) % window, 0, (-height) % window))
    y = naive_window_attention(block.attn, u, window, shift)[:, :height, :width]
    gamma_1 = block.gamma_1 if block.gamma_1 is not None else 1.0
    gamma_2 = block.gamma_2 if block.gamma_2 is not None else 1.0
    x = x + (gamma_1 * y).permute(0, 3, 1, 2)
    z = naive_layer_norm(x, block.norm2, 1e-6).permute(0, 2, 3, 1)
    z = F.gelu(z @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    return x + (gamma_2 * z).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------- buffers and geometry
@pytest.mark.parametrize("window", [7, 4])
def test_relative_position_index_formula(window):
    block = make_block((window, window), depth=0)
    assert block.window_size == window
    index = block.attn.relative_position_index
    assert index.dtype == torch.int64 and index.shape == (window**2, window**2)
    for p in range(window**2):
        for o in range(window**2):
            (yp, xp), (yo, xo) = divmod(p, window), divmod(o, window)
            assert index[p, o] == (yp - yo + window - 1) * (2 * window - 1) + (xp - xo + window - 1)


def test_shift_mask_buffer_from_band_labels():
    height, width, window, shift = 14, 21, 7, 3
    block = make_block((height, width), depth=1)
    mask = block.attn_mask
    assert mask.dtype == torch.float64 and mask.shape == (6, 49, 49)  # (double() converts the float buffer)
    labels = [[3 * band(r, height, window, shift) + band(c, width, window, shift) for c in range(width)]
              for r in range(height)]
    w = 0
    for wr in range(height // window):
        for wc in range(width // window):
            tokens = [labels[wr * window + t // window][wc * window + t % window] for t in range(window**2)]
            expected = torch.tensor([[0.0 if a == b else -100.0 for b in tokens] for a in tokens], dtype=mask.dtype)
            assert torch.equal(mask[w], expected), w
            w += 1
    assert set(SwinBlock(dim=32, depth=1, input_resolution=(56, 56), num_heads=(1,)).attn_mask.unique().tolist()) \
        == {-100.0, 0.0}


@pytest.mark.parametrize("resolution, depth, window, shift, has_mask", [
    ((56, 56), 0, 7, 0, False), ((56, 56), 1, 7, 3, True), ((8, 8), 1, 7, 3, True),
    ((7, 7), 1, 7, 0, False),  # `<=`: a map exactly one window wide shrinks to itself and never shifts
    ((7, 14), 1, 7, 0, False), ((4, 4), 1, 4, 0, False), ((2, 6), 1, 2, 0, False),
])
def test_classification_geometry(resolution, depth, window, shift, has_mask):
    block = SwinBlock(dim=DIM, depth=depth, input_resolution=resolution, num_heads=(HEADS,))
    assert (block.window_size, block.shift_size) == (window, shift)
    assert ("attn_mask" in block.state_dict()) == has_mask
    assert block.attn.relative_position_bias_table.shape == ((2 * window - 1) ** 2, HEADS)


@pytest.mark.parametrize("resolution", [(56, 56), (7, 7), (2, 3)])
def test_dense_geometry_is_window_7_shift_3_everywhere(resolution):
    for depth, shift in ((0, 0), (1, 3), (2, 0), (3, 3)):
        block = SwinBlock(dim=DIM, depth=depth, input_resolution=resolution, num_heads=(HEADS,), dense=True)
        assert (block.window_size, block.shift_size) == (7, shift)
        assert "attn_mask" not in block.state_dict()
        assert block.attn.relative_position_bias_table.shape == (169, HEADS)


# ----------------------------------------------------------------------------------- forward math
@pytest.mark.parametrize("resolution, depth", [((14, 14), 1), ((14, 21), 1), ((14, 14), 0), ((7, 7), 1), ((4, 4), 1)])
def test_classification_block_matches_naive_windows(resolution, depth, paths):
    block = make_block(resolution, depth)
    x = torch.randn(2, DIM, *resolution, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_block(block, x, block.window_size, block.shift_size)
        torch.testing.assert_close(block(x), expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dense", [False, True])
def test_mask_value_minus_100_is_visible_in_the_output(dense, paths):
    """With q = 0 the logits are bias + mask; a bias spread of ~±100 makes -100 distinguishable from -inf."""
    block = make_block((14, 14), 1, dense=dense)
    with torch.no_grad():
        block.attn.qkv.weight[:DIM] = 0
        block.attn.qkv.bias[:DIM] = 0
        block.attn.relative_position_bias_table.normal_(0, 40)
    x = torch.randn(1, DIM, 14, 14, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_block(block, x, 7, 3), atol=1e-10, rtol=1e-10)


def test_float32_block_matches_naive(paths):
    block = make_block((14, 14), 1).float()
    x = torch.randn(1, DIM, 14, 14) * 1e-3  # a tiny variance makes the LayerNorm eps (1e-6) matter
    with torch.no_grad():
        expected = naive_block(block, x, 7, 3)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
        block.norm1.eps = 1e-5  # the test is sensitive to the eps
        assert not torch.allclose(block(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size, depth", [((10, 12), 1), ((5, 9), 1), ((10, 12), 0), ((3, 16), 3)])
def test_dense_block_pads_then_crops(size, depth, paths):
    block = make_block((56, 56), depth, dense=True)  # the nominal resolution does not matter in dense mode
    x = torch.randn(2, DIM, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = naive_block(block, x, 7, 3 if depth % 2 else 0)
        out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("resolution, depth, same", [
    ((14, 14), 1, True), ((14, 21), 1, True), ((14, 14), 0, True),
    ((16, 16), 1, True),  # classification beyond the reference (padding) follows the dense rule
    ((7, 7), 0, True),
    ((7, 7), 1, False),  # classification does not shift a 7x7 map; detection does
    ((4, 4), 0, False),  # classification shrinks the window to 4; detection keeps 7 (different tables)
])
def test_dense_and_classification_agree_only_where_the_rules_coincide(resolution, depth, same, paths):
    cls_block = make_block(resolution, depth)
    dense_block = make_block(resolution, depth, dense=True)
    x = torch.randn(1, DIM, *resolution, dtype=torch.float64)
    if cls_block.attn.relative_position_bias_table.shape != dense_block.attn.relative_position_bias_table.shape:
        assert not same
        return
    dense_block.load_state_dict({k: v for k, v in cls_block.state_dict().items() if "attn_mask" not in k})
    with torch.no_grad():
        agree = torch.allclose(cls_block(x), dense_block(x), atol=1e-10, rtol=1e-10)
    assert agree == same


def test_classification_block_rejects_other_map_sizes():
    with pytest.raises(ValueError, match="14x14"):
        make_block((14, 14), 1)(torch.randn(1, DIM, 21, 14, dtype=torch.float64))


# ----------------------------------------------------------------------------------- layer scale
def test_layer_scale_semantics():
    block = SwinBlock(dim=DIM, depth=1, input_resolution=(14, 14), num_heads=(HEADS,), layer_scale_init_value=0.25)
    assert block.gamma_1.shape == (DIM,) and torch.all(block.gamma_1 == 0.25) and torch.all(block.gamma_2 == 0.25)
    plain = SwinBlock(dim=DIM, depth=1, input_resolution=(14, 14), num_heads=(HEADS,), layer_scale_init_value=0)
    assert plain.gamma_1 is None and not any("gamma" in k for k in plain.state_dict())
    # without γ the block is the γ = 1 block
    unit = SwinBlock(dim=DIM, depth=1, input_resolution=(14, 14), num_heads=(HEADS,), layer_scale_init_value=1.0)
    unit.load_state_dict({**plain.state_dict(), "gamma_1": torch.ones(DIM), "gamma_2": torch.ones(DIM)})
    x = torch.randn(1, DIM, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), unit(x))
    model = timm.create_model("unified_swin_micro", layer_scale_init_value=0, num_classes=0)
    assert not any("gamma" in k for k in model.state_dict())
    assert torch.all(timm.create_model("unified_swin_micro").stages[2][3].gamma_2 == 1e-6)


# ----------------------------------------------------------------------------------- input sizes
def test_input_size_error_messages():
    rule = SwinBlock.input_size_error
    assert rule(224, 224, (224, 224), False) is None
    assert rule(221, 224, (224, 224), False) is None  # same stage resolutions as 224
    assert rule(96, 160, (224, 224), True) is None  # dense: blocks pad
    message = rule(256, 256, (224, 224), False)
    assert "built for 224x224 inputs" in message and "pass img_size=256 to timm.create_model" in message
    assert "img_size=(256, 320)" in rule(256, 320, (224, 224), False)
    odd = rule(100, 100, (224, 224), False)
    assert "multiples of 32" in odd and "img_size=128" in odd
    assert "multiples of 32" in rule(100, 100, (100, 100), False)


def test_classifier_rejects_other_sizes_and_runs_at_its_own():
    model = timm.create_model("unified_swin_micro", num_classes=5).eval()
    with pytest.raises(ValueError, match="pass img_size=256"):
        model(torch.randn(1, 3, 256, 256))
    small = timm.create_model("unified_swin_micro", num_classes=5, img_size=64).eval()
    assert [(b.window_size, b.shift_size) for b in small.stages[0]] == [(7, 0), (7, 3)]  # 16x16: padded to 21
    assert small.stages[0][1].attn_mask.shape == (9, 49, 49)
    assert [b.window_size for b in small.stages[2]][:1] == [4] and small.stages[3][1].window_size == 2
    with torch.no_grad():
        assert small(torch.randn(2, 3, 64, 64)).shape == (2, 5)


# ----------------------------------------------------------------------------------- models
def test_features_and_dense_backbone_shapes():
    with torch.no_grad():
        features = timm.create_model("unified_swin_micro", features_only=True).eval()
        outs = features(torch.randn(1, 3, 224, 224))
        assert [tuple(o.shape[1:]) for o in outs] == [(32, 56, 56), (64, 28, 28), (128, 14, 14), (256, 7, 7)]
        dense = stm_backbones.create_dense_backbone("unified_swin_micro").eval()
        assert not any("attn_mask" in k for k in dense.state_dict())
        maps = dense(torch.randn(1, 3, 96, 160))
        assert [tuple(m.shape[1:]) for m in maps] == [(32, 24, 40), (64, 12, 20), (128, 6, 10), (256, 3, 5)]
        assert all(torch.isfinite(m).all() for m in maps)


def test_no_weight_decay_and_position_tables_are_the_bias_tables():
    model = timm.create_model("unified_swin_micro", num_classes=0)
    names = model.no_weight_decay()
    assert "stages.0.0.attn.relative_position_bias_table" in names and len(names) == 15  # one per block
    assert all(n.endswith(".attn.relative_position_bias_table") for n in names)
    assert model.position_tables() == names


def test_checkpoint_policies():
    """Index and mask buffers are derived from the geometry; tables of another window size are interpolated."""
    model = timm.create_model("unified_swin_micro", num_classes=0)
    derived = [k for k in model.state_dict() if k.endswith(("relative_position_index", "attn_mask"))]
    assert derived and all(k.split(".", 3)[3] in SwinBlock.derived_buffers for k in derived)
    target = torch.zeros(169, 2)
    constant = torch.tensor([1.5, -2.0]).repeat(625, 1)  # a 25x25 table (window 13), constant per head
    resized = SwinBlock.adapt_checkpoint_tensor("attn.relative_position_bias_table", constant, target)
    torch.testing.assert_close(resized, torch.tensor([1.5, -2.0]).repeat(169, 1))  # bicubic keeps constants
    other = torch.randn(4, 4)
    assert SwinBlock.adapt_checkpoint_tensor("attn.qkv.weight", other, torch.zeros(4, 4)) is other
    with pytest.raises(stm_backbones.CheckpointMismatchError, match="3 heads"):
        SwinBlock.adapt_checkpoint_tensor("attn.relative_position_bias_table", torch.zeros(169, 3), target)


def test_pretrained_cfg():
    cfg = timm.create_model("unified_swin_tiny", num_classes=0, depths=(1, 1, 1, 1)).pretrained_cfg
    assert cfg["fixed_input_size"] is True and "study_filename=unified_swin_tiny.pth" in cfg["notes"]


def test_patch_merging_concatenation_order():
    merge = PatchMerging(in_channels=4, out_channels=6)
    x = torch.randn(2, 4, 6, 8)
    nhwc = x.permute(0, 2, 3, 1)
    cat = torch.cat([nhwc[:, 0::2, 0::2], nhwc[:, 1::2, 0::2], nhwc[:, 0::2, 1::2], nhwc[:, 1::2, 1::2]], -1)
    assert torch.equal(cat[0, 1, 2, 4:8], x[0, :, 3, 4])  # (row odd, col even) block second
    expected = F.layer_norm(cat, (16,), merge.norm.weight, merge.norm.bias, 1e-5) @ merge.reduction.weight.T
    with torch.no_grad():
        torch.testing.assert_close(merge(x), expected.permute(0, 3, 1, 2))


def test_official_swin_tiny_structure_and_forward():
    model = timm.create_model("official_swin_tiny", num_classes=3).eval()
    keys = model.state_dict().keys()
    assert not any(k.startswith(("stage_norms", "conv_head")) for k in keys) and "stage_end_norm.weight" in keys
    assert model.pretrained_cfg["first_conv"] == "downsample_layers.0.proj"
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)
        with pytest.raises(ValueError, match="img_size"):
            model(torch.randn(1, 3, 221, 224))
        dense = stm_backbones.create_dense_backbone("official_swin_tiny").eval()  # any multiple of 32
        maps = dense(torch.randn(1, 3, 96, 160))
        assert [tuple(m.shape[-2:]) for m in maps] == [(24, 40), (12, 20), (6, 10), (3, 5)]
