"""Checkpoint loading: formats, the study's interpolation rules, clear mismatch errors."""

import argparse

import pytest
import timm
import torch

import stm_backbones
from stm_backbones.checkpoint import CheckpointMismatchError


def _randomised(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("layout", ["bare", "model", "model_ema", "training_script"])
def test_round_trip_formats(tmp_path, layout):
    source = _randomised(timm.create_model("unified_convnext_micro")).eval()
    sd = source.state_dict()
    payload = {"bare": sd, "model": {"model": sd}, "model_ema": {"model_ema": sd},
               "training_script": {"model": sd, "optimizer": {}, "epoch": 3, "scaler": {},
                                   "args": argparse.Namespace(model="unified_convnext_micro", lr=1e-3)}}[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    target = timm.create_model("unified_convnext_micro").eval()
    stm_backbones.load_checkpoint(target, path)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(image), source(image), rtol=0, atol=0)


def test_timm_pretrained_cfg_overlay_file(tmp_path):
    source = _randomised(timm.create_model("unified_convnext_micro"))
    path = tmp_path / "unified_convnext_micro.pth"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(epochs=300)}, path)
    model = timm.create_model("unified_convnext_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.head.weight, source.head.weight)
    features = timm.create_model("unified_convnext_micro", pretrained=True, features_only=True,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(features.model.stages[3][0].pwconv1.weight, source.stages[3][0].pwconv1.weight)


def test_pretrained_without_file_names_the_study_file():
    with pytest.raises(RuntimeError, match="unified_halonet_tiny.pth"):
        timm.create_model("unified_halo_tiny", pretrained=True)


def test_checkpoint_of_another_model_fails_with_one_clear_message(tmp_path):
    torch.save({"model": timm.create_model("unified_convnext_micro").state_dict()}, tmp_path / "c.pth")
    target = timm.create_model("unified_convnext_tiny")
    with pytest.raises(CheckpointMismatchError) as info:
        stm_backbones.load_checkpoint(target, tmp_path / "c.pth")
    message = str(info.value)
    assert "unified_convnext_tiny" in message and "shape mismatches" in message
    assert "downsample_layers.0.stem.0.weight" in message and len(message) < 2000
    swin = timm.create_model("unified_swin_micro")
    with pytest.raises(CheckpointMismatchError, match="unified_swin_micro.*missing.*unexpected"):
        swin.load_state_dict(timm.create_model("unified_convnext_micro").state_dict())


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        stm_backbones.load_checkpoint(timm.create_model("unified_convnext_micro"), tmp_path / "nope.pth")


def test_stored_index_and_mask_buffers_are_ignored():
    """An EMA checkpoint carries truncated relative_position_index values: the model keeps its own."""
    model = timm.create_model("unified_swin_micro")
    own = {k: v.clone() for k, v in model.state_dict().items() if "relative_position_index" in k or "attn_mask" in k}
    assert own
    sd = model.state_dict()
    corrupted = {k: (v - 1).clamp(min=0) if k in own else v for k, v in sd.items()}
    model.load_state_dict(corrupted)
    for key, value in own.items():
        assert torch.equal(model.state_dict()[key], value), key
    # also loads when the checkpoint has no such buffers at all
    model.load_state_dict({k: v for k, v in sd.items() if k not in own})


def test_relative_position_table_is_resized_bicubic_and_identity_when_equal():
    model = timm.create_model("unified_swin_micro")
    sd = model.state_dict()
    key = "stages.0.0.attn.relative_position_bias_table"
    heads = sd[key].shape[1]
    same = torch.randn(169, heads)
    model.load_state_dict({**sd, key: same})
    assert torch.equal(model.state_dict()[key], same)
    # a 25x25 table (window 13) with a constant per head: bicubic resizing keeps constants exactly
    constant = torch.arange(heads, dtype=torch.float32).repeat(625, 1)
    model.load_state_dict({**sd, key: constant})
    torch.testing.assert_close(model.state_dict()[key], torch.arange(heads, dtype=torch.float32).repeat(169, 1))


def test_halo_embeddings_resized_linearly_with_aligned_corners():
    model = timm.create_model("unified_halo_micro")
    sd = model.state_dict()
    key = "stages.1.0.attn.pos_embed.height_rel"
    rows, width = sd[key].shape
    # a linear ramp over 49 rows must become the same ramp over the model's rows (align_corners=True)
    ramp = torch.linspace(-1, 1, 49)[:, None] * torch.arange(1, width + 1, dtype=torch.float32)
    model.load_state_dict({**sd, key: ramp})
    expected = torch.linspace(-1, 1, rows)[:, None] * torch.arange(1, width + 1, dtype=torch.float32)
    torch.testing.assert_close(model.state_dict()[key], expected, atol=1e-6, rtol=1e-6)


def test_pvt_pos_embed_resized_bilinearly_with_aligned_corners():
    model = timm.create_model("unified_pvt_micro")
    sd = model.state_dict()
    key = "stages.0.0.pos_embed"
    channels, height, width = sd[key].shape[1:]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing="ij")
    plane = (2 * ys + 3 * xs)[None, None].repeat(1, channels, 1, 1)  # bilinear keeps affine maps exactly
    model.load_state_dict({**sd, key: plane})
    ys, xs = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    torch.testing.assert_close(model.state_dict()[key], (2 * ys + 3 * xs)[None, None].repeat(1, channels, 1, 1),
                               atol=1e-5, rtol=1e-5)


def test_label_map_selects_head_rows(tmp_path):
    source = _randomised(timm.create_model("unified_convnext_micro"))
    label_map = tmp_path / "labels.txt"
    label_map.write_text("7\n3\n999\n")
    target = timm.create_model("unified_convnext_micro", num_classes=3)
    stm_backbones.load_checkpoint(target, {"model": source.state_dict()}, label_map_path=str(label_map))
    torch.testing.assert_close(target.head.weight, source.head.weight[[7, 3, 999]])
    torch.testing.assert_close(target.head.bias, source.head.bias[[7, 3, 999]])


def test_head_of_another_size_without_label_map_is_a_clear_error():
    target = timm.create_model("unified_convnext_micro", num_classes=3)
    with pytest.raises(CheckpointMismatchError, match=r"head.weight \(checkpoint \(1000, 384\) vs model \(3, 384\)\)"):
        stm_backbones.load_checkpoint(target, timm.create_model("unified_convnext_micro").state_dict())


@pytest.mark.parametrize("name", ["unified_convnext_micro", "unified_swin_micro", "unified_dcn_v3_micro"])
def test_classification_checkpoint_into_dense_backbone(tmp_path, name):
    source = _randomised(timm.create_model(name))
    torch.save({"model": source.state_dict()}, tmp_path / "c.pth")
    dense = stm_backbones.create_dense_backbone(name, pretrained=tmp_path / "c.pth")
    own = dense.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith("stages.") and "attn_mask" not in key:
            assert torch.equal(own[key], value), key
    assert torch.equal(own["out_norm_0.weight"], torch.ones_like(own["out_norm_0.weight"]))  # fresh
    with pytest.raises(CheckpointMismatchError, match="missing"):
        stm_backbones.load_into_dense_backbone(dense, {"model": {"head.weight": torch.zeros(1)}})


@pytest.fixture
def restore_safe_globals():
    saved = list(torch.serialization.get_safe_globals())
    yield
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


def test_loading_keeps_a_process_wide_namespace_allowance(tmp_path, restore_safe_globals):
    # Apps allow argparse.Namespace for weights-only loads process-wide; our loader must not undo that.
    torch.serialization.add_safe_globals([argparse.Namespace])
    path = tmp_path / "with_args.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, path)
    assert stm_backbones.checkpoint.read_checkpoint(path)["args"].lr == 1.0
    assert argparse.Namespace in torch.serialization.get_safe_globals()
    assert torch.load(path, weights_only=True)["args"].lr == 1.0


def test_loading_without_allowance_leaves_none_behind(tmp_path, restore_safe_globals):
    torch.serialization.clear_safe_globals()
    path = tmp_path / "with_args.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, path)
    assert stm_backbones.checkpoint.read_checkpoint(path)["args"].lr == 1.0
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
