"""Optimizer and LR schedule: AdamW with weight decay 0 on norms, position embeddings and relative
position tables (every mixer), the recipe's linear warmup and steps."""

from __future__ import annotations

import pytest
import torch
from det_test_utils import BASE_CONFIG, MIXERS, SMALL_OVERRIDES, load_cfg

import stm_backbones

NO_DECAY_MARKERS = ("norm", "pos_embed", "relative_position_bias_table", "height_rel", "width_rel")


@pytest.mark.parametrize("mixer", MIXERS)
def test_param_groups(mixer):
    from detectron2.modeling import build_model

    from stm_det.trainer import build_optimizer

    name = f"unified_{mixer}_micro"
    if name not in stm_backbones.list_models():
        pytest.skip(f"{name} is not registered in stm_backbones (yet)")
    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", name])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 1e-4 and decay["betas"] == (0.9, 0.999)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert not_decayed == {n for n in names.values() if any(k in n for k in NO_DECAY_MARKERS)}
    # Every norm named "norm" (block norms, the fresh out norms) is in the no-decay group; the stem and
    # downsample LayerNorms, whose names do not say "norm", are decayed as in the study's config ...
    named_norms = {f"{m}.{p}" for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)
                   if "norm" in m}
    assert named_norms and named_norms <= not_decayed
    assert "backbone.bottom_up.body.downsample_layers.0.stem.1.weight" in decayed
    assert "backbone.bottom_up.body.downsample_layers.1.reduction.1.weight" in decayed
    assert {f"backbone.bottom_up.body.out_norm_{i}.weight" for i in range(4)} <= not_decayed
    # ... and so are the position embeddings / relative tables of the mixer that has them.
    marker = {"halo": "height_rel", "pvt": "pos_embed", "swin": "relative_position_bias_table"}.get(mixer)
    if marker:
        assert any(marker in n for n in not_decayed)
        assert not any(marker in n for n in decayed)
    # Convolution / linear weights, biases and the heads are decayed.
    assert "backbone.fpn_lateral2.weight" in decayed and "backbone.fpn_lateral2.bias" in decayed
    assert "roi_heads.box_predictor.cls_score.weight" in decayed
    assert any(n.startswith("backbone.bottom_up.body.stages.0.0.") and n.endswith(".bias") for n in decayed)


def test_no_decay_norm_layers_option():
    from detectron2.modeling import build_model

    from stm_det.trainer import build_optimizer

    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "SOLVER.NO_DECAY_NORM_LAYERS", "True"])
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    not_decayed = {names[id(p)] for p in build_optimizer(cfg, model).param_groups[1]["params"]}
    body = "backbone.bottom_up.body."
    for n in ("downsample_layers.0.stem.1.weight", "downsample_layers.0.stem.4.bias",
              "downsample_layers.3.reduction.1.weight", "stages.0.0.dw_norm.weight", "out_norm_3.bias"):
        assert body + n in not_decayed, n
    assert body + "downsample_layers.3.reduction.0.weight" not in not_decayed  # the conv


def test_recipe_exact_no_decay_keys():
    """The mmdet config's custom_keys, settable through SOLVER.NO_DECAY_KEYS."""
    from detectron2.modeling import build_model

    from stm_det.trainer import build_param_groups

    model = build_model(load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", "unified_convnext_micro"]))
    groups = build_param_groups(model, 0.05, ["absolute_pos_embed", "relative_position_bias_table", "norm"])
    assert all("norm" in n for n in groups[1]["param_names"])
    assert not any("norm" in n for n in groups[0]["param_names"])


def test_sgd_and_clipping_options():
    from detectron2.modeling import build_model

    from stm_det.trainer import build_optimizer

    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "SOLVER.OPTIMIZER", "SGD", "SOLVER.CLIP_GRADIENTS.ENABLED", "True"])
    opt = build_optimizer(cfg, build_model(cfg))
    assert isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGDWithGradientClip"
    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "SOLVER.OPTIMIZER", "LAMB"])
    with pytest.raises(ValueError, match="ADAMW or SGD"):
        build_optimizer(cfg, build_model(cfg))


def test_lr_schedule():
    from detectron2.solver import build_lr_scheduler

    cfg = load_cfg(BASE_CONFIG)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    wanted = (0, 500, 999, 1000, 58639, 58640, 80629, 80630, 87959)
    lrs = {}
    for i in range(cfg.SOLVER.MAX_ITER):  # the LRScheduler hook steps once per iteration
        if i in wanted:
            lrs[i] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    lr = 1e-4
    for i in (0, 500, 999):  # lr * (1 - (1 - i / 1000) * (1 - 0.001))
        assert lrs[i] == pytest.approx(lr * (1 - (1 - i / 1000) * (1 - 0.001)), rel=1e-6), i
    assert lrs[1000] == pytest.approx(lr) and lrs[58639] == pytest.approx(lr)
    assert lrs[58640] == pytest.approx(lr * 0.1) and lrs[80629] == pytest.approx(lr * 0.1)
    assert lrs[80630] == pytest.approx(lr * 0.01) and lrs[87959] == pytest.approx(lr * 0.01)
