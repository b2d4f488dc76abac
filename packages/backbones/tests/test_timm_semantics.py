"""timm semantics of the unified models: num_features / head_hidden_size, global_pool, forward_intermediates(norm,
output_fmt), the feature wrappers (feature_cls, output_fmt, pretrained_cfg), set_input_size, fixed_input_size and
strict constructor arguments. Oracles: timm's documented contracts, the modules applied by hand, fresh models."""

import pytest
import timm
import torch
from timm.data import resolve_data_config

import stm_backbones

MICRO = ["unified_convnext_micro", "unified_halo_micro", "unified_swin_micro", "unified_pvt_micro",
         "unified_dcn_v3_micro", "unified_pvt_v2_micro"]
FIXED = {"unified_halo_micro", "unified_swin_micro", "unified_pvt_micro"}  # fixed_input_size models


def _create(name, **kwargs):
    """A micro model on a small input: 64 px (Swin / PVT built for it), Halo at its 224."""
    if name in ("unified_swin_micro", "unified_pvt_micro"):
        kwargs.setdefault("img_size", 64)
    size = 224 if name == "unified_halo_micro" else 64
    return timm.create_model(name, **kwargs).eval(), torch.randn(1, 3, size, size,
                                                                 generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", MICRO)
def test_num_features_head_hidden_size_and_global_pool(name):
    model, x = _create(name, num_classes=5)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[1] == model.num_features == model.dims[-1]
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        logits = model(x)
        model.reset_classifier(0, "")  # no head, no pooling: the pre-logits map
        unpooled = model(x)
        assert unpooled.shape[:2] == (1, model.head_hidden_size) and unpooled.shape[2:] == features.shape[2:]
        torch.testing.assert_close(unpooled.mean((2, 3)), pre, rtol=1e-5, atol=1e-6)  # pooling was the only change
        model.reset_classifier(0)  # keeps global_pool=''
        assert model(x).dim() == 4 and model.global_pool == ""
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), pre, rtol=0, atol=0)

        # global_pool='' at creation with a classifier: per-position logits, whose mean is the pooled logits
        per_position, _ = _create(name, num_classes=5, global_pool="")
        reference, _ = _create(name, num_classes=5)
        reference.load_state_dict(per_position.state_dict())
        maps = per_position(x)
        assert maps.shape[:2] == (1, 5) and maps.dim() == 4
        torch.testing.assert_close(maps.mean((2, 3)), reference(x), rtol=1e-4, atol=1e-5)
    assert logits.shape == (1, 5)
    with pytest.raises(ValueError, match="global_pool"):
        _create(name, global_pool="max")


@pytest.mark.parametrize("name", MICRO)
def test_forward_intermediates_norm_and_output_fmt(name):
    model, x = _create(name, num_classes=0)
    with torch.no_grad():
        final, raw = model.forward_intermediates(x)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
        nhwc = model.forward_intermediates(x, norm=True, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        for i, (r, n, h) in enumerate(zip(raw, normed, nhwc, strict=True)):
            torch.testing.assert_close(n, model.stage_norms[i](r), rtol=0, atol=0)  # norm=True applies the stage norm
            torch.testing.assert_close(h, n.permute(0, 2, 3, 1), rtol=0, atol=0)
        assert not torch.allclose(raw[0], normed[0])  # norm=True is not a no-op


def test_dense_backbone_intermediates_norm():
    dense = stm_backbones.create_dense_backbone("unified_convnext_micro").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        raw = dense.forward_intermediates(x, intermediates_only=True)
        for i, (r, out) in enumerate(zip(raw, dense(x), strict=True)):
            torch.testing.assert_close(out, getattr(dense, f"out_norm_{i}")(r), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["unified_convnext_micro", "unified_dcn_v3_micro", "unified_halo_micro"])
def test_feature_classes_agree_and_keep_their_cfg(name):
    kwargs = dict(img_size=64) if name in ("unified_swin_micro", "unified_pvt_micro") else {}
    size = 224 if name == "unified_halo_micro" else 64
    x = torch.randn(1, 3, size, size)
    torch.manual_seed(0)
    getter = timm.create_model(name, features_only=True, **kwargs).eval()
    state = getter.model.state_dict()
    with torch.no_grad():
        want = getter(x)
        for feature_cls in ("getter", "hook", "dict", "fx", "list"):
            torch.manual_seed(0)
            for fmt in ("NCHW", "NHWC"):
                features = timm.create_model(name, features_only=True, feature_cls=feature_cls, output_fmt=fmt,
                                             **kwargs).eval()
                inner = getattr(features, "model", None) or getattr(features, "body", None)
                if inner is not None:
                    inner.load_state_dict(state, strict=False)
                else:  # fx: a GraphModule holding the model's parameters under their names
                    features.graph_module.load_state_dict(
                        {k: v for k, v in state.items() if k in features.graph_module.state_dict()}, strict=False)
                assert features.pretrained_cfg["architecture"] == name
                assert features.feature_info.channels() == [o.shape[1] for o in want]
                got = features(x)
                if feature_cls == "dict":
                    assert isinstance(got, dict) and list(got) == [f"stage_norms.{i}" for i in range(4)]
                    got = list(got.values())
                expected = [w.permute(0, 2, 3, 1) if fmt == "NHWC" else w for w in want]
                for g, w in zip(got, expected, strict=True):
                    torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=f"{feature_cls} {fmt}")
    with pytest.raises(ValueError, match="feature_cls"):
        timm.create_model(name, features_only=True, feature_cls="nope", **kwargs)
    with pytest.raises(ValueError, match="output_fmt"):
        timm.create_model(name, features_only=True, output_fmt="NLC", **kwargs)


def test_torchvision_feature_extractor_with_timm_tracer_settings():
    from torchvision.models.feature_extraction import create_feature_extractor

    model, x = _create("unified_swin_micro", num_classes=0)
    extractor = create_feature_extractor(model, return_nodes={"stage_norms.2": "s2", "head": "out"}, tracer_kwargs=dict(
        leaf_modules=timm.layers.get_notrace_modules(), autowrap_functions=timm.layers.get_notrace_functions()))
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["s2"], model.forward_intermediates(x, indices=[2], norm=True,
                                                                          intermediates_only=True)[0])
        torch.testing.assert_close(out["out"], model(x))


@pytest.mark.parametrize("name, new_size", [("unified_swin_micro", 96), ("unified_pvt_micro", (96, 128)),
                                            ("unified_convnext_micro", 96)])
def test_set_input_size_equals_a_model_built_for_it_and_loaded_by_the_loader(name, new_size):
    model, _ = _create(name, num_classes=3)
    model.downsample_layers.requires_grad_(False)
    model.train()
    model.set_input_size(img_size=new_size)
    assert model.training and not any(p.requires_grad for p in model.downsample_layers.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())
    # the oracle: the pre-resize weights through the loader's rules into a model built for the new size
    fresh = timm.create_model(name, num_classes=3, img_size=new_size).eval()
    original, _ = _create(name, num_classes=3)
    resized, _ = _create(name, num_classes=3)
    resized.load_state_dict(original.state_dict())
    resized.set_input_size(img_size=new_size)
    stm_backbones.load_checkpoint(fresh, original.state_dict())
    h, w = (new_size, new_size) if isinstance(new_size, int) else new_size
    x = torch.randn(2, 3, h, w)
    resized.eval()
    with torch.no_grad():
        torch.testing.assert_close(resized(x), fresh(x), rtol=0, atol=0)
    if name == "unified_swin_micro":  # its classifier now takes only the new size
        with pytest.raises(ValueError, match="img_size"):
            resized(torch.randn(1, 3, 64, 64))


def test_halo_declares_its_fixed_input_size():
    model = timm.create_model("unified_halo_micro")
    assert model.pretrained_cfg["fixed_input_size"] is True
    assert resolve_data_config(model=model)["input_size"] == (3, 224, 224)


def test_unknown_constructor_argument_is_a_type_error():
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("unified_convnext_micro", not_a_model_arg=1)


def test_meta_device_and_dtype():
    model = timm.create_model("unified_dcn_v3_micro", device="meta", dtype=torch.float64)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    model.reset_classifier(7)
    assert model.head.weight.device.type == "meta" and model.head.weight.dtype == torch.float64
