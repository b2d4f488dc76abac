"""Optimizer and LR schedule: AdamW with weight decay 0 on norms and on the position tables that each mixer
family declares (every registered mixer), the recipe's linear warmup and steps."""

from __future__ import annotations

import pytest
import torch
from det_test_utils import BASE_CONFIG, SMALL_OVERRIDES, SMALLEST, load_cfg

import stm_backbones

BODY = "backbone.bottom_up.body."
# The detection app's substring list before the families declared their position tables: for the study's
# mixers the family rule ("norm" + MetaArch.position_tables()) must give exactly the same groups.
OLD_NO_DECAY_KEYS = ("norm", "pos_embed", "absolute_pos_embed", "relative_position_bias_table", "height_rel",
                     "width_rel")


def _groups(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = opt.param_groups
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}, set(names.values())


@pytest.mark.parametrize("name", SMALLEST)
def test_param_groups(name):
    from detectron2.modeling import build_model

    from stm_det.trainer import build_optimizer

    family, _ = stm_backbones.family_of(name)
    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", name])
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 1e-4 and decay["betas"] == (0.9, 0.999)
    decayed, not_decayed, names = _groups(model, opt)
    assert decayed | not_decayed == names and not decayed & not_decayed
    # "norm" substrings + the family's position tables, found under the trunk's prefix ...
    tables = {BODY + n for n in model.backbone.bottom_up.body.position_tables()}
    assert tables <= names
    assert not_decayed == {n for n in names if "norm" in n} | tables
    for table in family.block_type.position_tables:  # each declared table is found in the blocks
        assert any(n.endswith("." + table) for n in tables), table
    # ... which for the study's mixers is exactly what the old substring list gave
    if family.study:
        assert not_decayed == {n for n in names if any(k in n for k in OLD_NO_DECAY_KEYS)}
    # Every norm named "norm" (block norms, the fresh out norms) is in the no-decay group; the stem and
    # downsample LayerNorms, whose names do not say "norm", are decayed as in the study's config ...
    named_norms = {f"{m}.{p}" for m, mod in model.named_modules() for p, _ in mod.named_parameters(recurse=False)
                   if "norm" in m}
    assert named_norms and named_norms <= not_decayed
    assert BODY + "downsample_layers.0.stem.1.weight" in decayed
    assert BODY + "downsample_layers.1.reduction.1.weight" in decayed
    assert {f"{BODY}out_norm_{i}.weight" for i in range(4)} <= not_decayed
    # Convolution / linear weights, biases and the heads are decayed.
    assert "backbone.fpn_lateral2.weight" in decayed and "backbone.fpn_lateral2.bias" in decayed
    assert "roi_heads.box_predictor.cls_score.weight" in decayed
    assert any(n.startswith(BODY + "stages.0.0.") and n.endswith(".bias") for n in decayed)


def test_position_tables_come_from_the_family():
    """The study's tables by family (PVT pos_embed, Halo height_rel / width_rel, Swin relative tables), and
    SOLVER.NO_DECAY_POSITION_TABLES False decays them."""
    from detectron2.modeling import build_model

    from stm_det.trainer import build_optimizer

    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", "unified_halo_micro"])
    model = build_model(cfg)
    _, not_decayed, _ = _groups(model, build_optimizer(cfg, model))
    assert BODY + "stages.0.0.attn.pos_embed.height_rel" in not_decayed
    assert BODY + "stages.3.1.attn.pos_embed.width_rel" in not_decayed
    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", "unified_halo_micro",
                                 "SOLVER.NO_DECAY_POSITION_TABLES", "False"])
    decayed, not_decayed, _ = _groups(model, build_optimizer(cfg, model))
    assert BODY + "stages.0.0.attn.pos_embed.height_rel" in decayed
    assert not any("_rel" in n for n in not_decayed)


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
    """The study's mmdet config (custom_keys only): SOLVER.NO_DECAY_KEYS = STUDY_MMDET_NO_DECAY_KEYS with
    SOLVER.NO_DECAY_POSITION_TABLES False; PVT's pos_embed is then decayed, as there."""
    from detectron2.modeling import build_model

    from stm_det import STUDY_MMDET_NO_DECAY_KEYS
    from stm_det.trainer import build_optimizer, build_param_groups

    keys = list(STUDY_MMDET_NO_DECAY_KEYS)
    cfg = load_cfg(BASE_CONFIG, [*SMALL_OVERRIDES, "MODEL.UNIFIED.NAME", "unified_pvt_micro", "SOLVER.NO_DECAY_KEYS",
                                 str(keys), "SOLVER.NO_DECAY_POSITION_TABLES", "False"])
    model = build_model(cfg)
    decayed, not_decayed, names = _groups(model, build_optimizer(cfg, model))
    assert not_decayed == {n for n in names if any(k in n for k in keys)}
    assert BODY + "stages.0.0.pos_embed" in decayed
    groups = build_param_groups(model, 0.05, keys, no_decay_position_tables=False)
    assert set(groups[1]["param_names"]) == not_decayed


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
