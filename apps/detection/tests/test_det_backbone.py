"""The detectron2 backbone: shapes and strides (non-square inputs), FPN levels, config errors,
classification-checkpoint loading (MODEL.UNIFIED.PRETRAINED) and MODEL.WEIGHTS overriding it."""

from __future__ import annotations

import pytest
import torch
from det_test_utils import BASE_CONFIG, SMALL_OVERRIDES, SMALLEST, load_cfg

import stm_backbones
from stm_det.backbone import UnifiedBackbone

MICROS = list(SMALLEST)  # every registered mixer's smallest model


def _need(name):
    if name not in stm_backbones.list_models():
        pytest.skip(f"{name} is not registered in stm_backbones (yet)")


def _cfg(name, *opts):
    return load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", name, *opts])


@pytest.mark.parametrize("name", MICROS)
@pytest.mark.parametrize("hw", [(96, 160), (256, 192)])
def test_shapes_and_strides(name, hw):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    _need(name)
    cfg = _cfg(name)
    fpn = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    trunk = fpn.bottom_up
    dims = stm_backbones.create_dense_backbone(name).dims
    h, w = hw
    expected_trunk = {f"res{i + 2}": (dims[i], 4 * 2 ** i) for i in range(4)}
    assert {k: (v.channels, v.stride) for k, v in trunk.output_shape().items()} == expected_trunk
    assert trunk.size_divisibility == fpn.size_divisibility == 32
    with torch.no_grad():
        x = torch.randn(1, 3, h, w)
        feats = trunk(x)
        for k, (c, s) in expected_trunk.items():
            assert tuple(feats[k].shape) == (1, c, h // s, w // s), k
        pyramid = fpn(x)
    expected_fpn = {f"p{i}": 2 ** i for i in range(2, 7)}
    assert {k: v.stride for k, v in fpn.output_shape().items()} == expected_fpn
    for k, s in expected_fpn.items():
        assert tuple(pyramid[k].shape) == (1, 256, -(-h // s), -(-w // s)), k


def test_out_indices_subset_and_errors():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = _cfg("unified_convnext_micro", "MODEL.BACKBONE.NAME", "build_unified_backbone",
               "MODEL.UNIFIED.OUT_INDICES", "(1, 3)", "MODEL.UNIFIED.OUT_FEATURES", '["c3", "c5"]')
    trunk = build_backbone(cfg, ShapeSpec(channels=3))
    assert {k: v.stride for k, v in trunk.output_shape().items()} == {"c3": 8, "c5": 32}
    assert set(trunk(torch.randn(1, 3, 64, 64))) == {"c3", "c5"}
    with pytest.raises(ValueError, match="same length"):
        build_backbone(_cfg("unified_convnext_micro", "MODEL.UNIFIED.OUT_FEATURES", '["res2"]'), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="not a registered model"):
        build_backbone(_cfg("unified_nope_micro"), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_backbone(_cfg("unified_convnext_micro", "MODEL.UNIFIED.OUT_INDICES", "(1, 2, 3)",
                            "MODEL.UNIFIED.OUT_FEATURES", '["res3", "res4", "res5"]'), ShapeSpec(channels=3))


def test_default_drop_path_follows_size():
    cfg = _cfg("unified_convnext_micro", "MODEL.UNIFIED.DROP_PATH_RATE", "None")
    from detectron2.modeling import build_model

    model = build_model(cfg)
    rates = [m.drop_prob for m in model.backbone.bottom_up.body.modules() if hasattr(m, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.1)


def test_pretrained_then_model_weights(tmp_path):
    """PRETRAINED fills the trunk when it is built (out norms stay fresh); MODEL.WEIGHTS, loaded by the
    checkpointer afterwards, overrides it."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(1)
    cls_model = stm_backbones.create_model("unified_convnext_micro", num_classes=10)
    with torch.no_grad():
        for p in cls_model.parameters():
            p.add_(torch.randn_like(p))
    ckpt = tmp_path / "cls.pth"
    torch.save({"model": cls_model.state_dict()}, ckpt)
    cls_state = cls_model.state_dict()

    model = build_model(_cfg("unified_convnext_micro", "MODEL.UNIFIED.PRETRAINED", str(ckpt)))
    body = model.backbone.bottom_up.body.state_dict()
    loaded = [k for k in body if k in cls_state]
    assert len(loaded) > 50
    for k in loaded:
        torch.testing.assert_close(body[k], cls_state[k], msg=k)
    out_norms = [k for k in body if k.startswith("out_norm_")]
    assert len(out_norms) == 8
    for k in out_norms:
        assert torch.equal(body[k], torch.ones_like(body[k]) if k.endswith("weight") else torch.zeros_like(body[k]))

    # A detection checkpoint (MODEL.WEIGHTS) wins over PRETRAINED.
    other = build_model(_cfg("unified_convnext_micro"))
    with torch.no_grad():
        for p in other.parameters():
            p.fill_(0.5)
    DetectionCheckpointer(other, save_dir=str(tmp_path)).save("det")
    DetectionCheckpointer(model).resume_or_load(str(tmp_path / "det.pth"), resume=False)
    assert all(torch.all(p == 0.5) for p in model.parameters())


def test_compile_keeps_parameter_names():
    from detectron2.modeling import build_model

    plain = build_model(_cfg("unified_convnext_micro"))
    compiled = build_model(_cfg("unified_convnext_micro", "MODEL.UNIFIED.COMPILE", "True"))
    assert list(plain.state_dict()) == list(compiled.state_dict())


def test_compiled_trunk_trains_at_two_non_square_sizes():
    """COMPILE True: forward + backward at two padded sizes (one graph each) equal the eager trunk's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = UnifiedBackbone("unified_convnext_micro")
    compiled = UnifiedBackbone("unified_convnext_micro", compile=True)
    compiled.load_state_dict(eager.state_dict())
    for size in [(64, 96), (96, 64)]:
        image = torch.randn(1, 3, *size)
        grads = []
        for model in (eager, compiled):
            model.zero_grad()
            outs = model(image)
            sum(o.square().sum() for o in outs.values()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
            assert outs["res5"].shape[-2:] == (size[0] // 32, size[1] // 32)
        scale = float(grads[0].abs().max())  # float32 summation-order noise, relative to the largest gradient
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5 * scale)


def test_layer_scale_init_value_key():
    from detectron2.modeling import build_model

    model = build_model(_cfg("unified_convnext_micro", "MODEL.UNIFIED.LAYER_SCALE_INIT_VALUE", "0.1"))
    gammas = [p for n, p in model.named_parameters() if "gamma" in n]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 0.1)) for g in gammas)
