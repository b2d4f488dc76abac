"""The generated Mask R-CNN configs (every size of the study's mixers, from the registry): files up to date,
recipe values, and every model builds and runs (training losses finite, inference outputs) on a small CPU image
with random weights."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from det_test_utils import (
    BASE_CONFIG,
    CONFIGS_DIR,
    DEMO_CONFIG,
    SMALL_OVERRIDES,
    STUDY_CONFIGS,
    config_path,
    load_cfg,
)

import stm_backbones

ALL = list(STUDY_CONFIGS)
# The study's detection drop path by size (its mmdet configs), the same for every mixer.
STUDY_DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3}


def _generate_module():
    spec = importlib.util.spec_from_file_location("stm_det_generate", CONFIGS_DIR / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_configs_are_up_to_date():
    gen = _generate_module()
    assert gen.main(["--check"]) == 0, "run apps/detection/configs/generate.py"
    rendered = gen.render()
    assert sorted(rendered) == sorted(config_path(m, s).name for m, s in ALL)
    # the study's 5 mixers x (micro, tiny, small, base), and DCNv3's large, which has no reported figure
    assert len(rendered) >= 20 and {m for m, _ in ALL} >= {"halo", "pvt", "swin", "convnext", "dcn_v3"}
    assert "(COCO val2017): 39.2 / 36.4." in rendered[config_path("convnext", "micro").name]
    assert "(COCO val2017): not reported." in rendered[config_path("dcn_v3", "large").name]


def test_base_config_is_the_recipe():
    cfg = load_cfg(BASE_CONFIG)
    iters_per_epoch = math.ceil(117266 / 16)  # COCO train2017 images with annotations, batch 16
    assert iters_per_epoch == 7330
    s = cfg.SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS)) == (12 * 7330, (8 * 7330, 11 * 7330)) == (87960, (58640, 80630))
    assert s.CHECKPOINT_PERIOD == cfg.TEST.EVAL_PERIOD == iters_per_epoch
    assert (s.OPTIMIZER, s.BASE_LR, tuple(s.BETAS), s.WEIGHT_DECAY, s.IMS_PER_BATCH) == ("ADAMW", 1e-4, (0.9, 0.999),
                                                                                           0.05, 16)
    assert (s.WARMUP_METHOD, s.WARMUP_FACTOR, s.WARMUP_ITERS, s.GAMMA) == ("linear", 0.001, 1000, 0.1)
    assert not s.CLIP_GRADIENTS.ENABLED and not s.AMP.ENABLED
    assert list(s.NO_DECAY_KEYS) == ["norm"] and s.NO_DECAY_POSITION_TABLES  # + the family's position tables
    m = cfg.MODEL
    assert m.BACKBONE.NAME == "build_unified_fpn_backbone" and m.MASK_ON and m.WEIGHTS == ""
    assert cfg.INPUT.FORMAT == "RGB"
    assert tuple(m.PIXEL_MEAN) == (123.675, 116.28, 103.53) and tuple(m.PIXEL_STD) == (58.395, 57.12, 57.375)
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (800,) and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.RANDOM_FLIP) == (800, 1333, "horizontal")
    assert m.FPN.OUT_CHANNELS == 256 and list(m.RPN.IN_FEATURES) == ["p2", "p3", "p4", "p5", "p6"]
    assert [list(x) for x in m.ANCHOR_GENERATOR.SIZES] == [[32], [64], [128], [256], [512]]
    assert (m.RPN.PRE_NMS_TOPK_TRAIN, m.RPN.POST_NMS_TOPK_TRAIN, m.RPN.PRE_NMS_TOPK_TEST,
            m.RPN.POST_NMS_TOPK_TEST, m.RPN.NMS_THRESH) == (2000, 1000, 1000, 1000, 0.7)
    assert (m.ROI_HEADS.BATCH_SIZE_PER_IMAGE, m.ROI_HEADS.POSITIVE_FRACTION, m.ROI_HEADS.NUM_CLASSES) == (512, 0.25, 80)
    assert (m.ROI_HEADS.SCORE_THRESH_TEST, m.ROI_HEADS.NMS_THRESH_TEST, cfg.TEST.DETECTIONS_PER_IMAGE) == (0.05, 0.5, 100)
    assert (m.ROI_BOX_HEAD.NUM_FC, m.ROI_BOX_HEAD.FC_DIM, tuple(m.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)) == (2, 1024,
                                                                                                    (10, 10, 5, 5))
    assert (m.ROI_MASK_HEAD.NUM_CONV, m.ROI_MASK_HEAD.POOLER_RESOLUTION) == (4, 14)
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",) and tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)


@pytest.mark.parametrize("mixer,size", ALL)
def test_config_values(mixer, size):
    cfg = load_cfg(config_path(mixer, size))
    assert cfg.MODEL.UNIFIED.NAME == f"unified_{mixer}_{size}"
    assert cfg.MODEL.UNIFIED.DROP_PATH_RATE == stm_backbones.get_family(mixer).detection_drop_path(size)
    if size in STUDY_DROP_PATH:
        assert cfg.MODEL.UNIFIED.DROP_PATH_RATE == STUDY_DROP_PATH[size]
    assert cfg.SOLVER.MAX_ITER == 87960 and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80


def _synthetic_batch(h, w, num_classes):
    """Two images (CHW float, RGB 0..255) with two boxes + bitmasks each."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    batch = []
    for _ in range(2):
        image = torch.rand(3, h, w, generator=g) * 255
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [w / 2, h / 3, w - 3.0, h - 5.0]])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, num_classes - 1])
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch


def _check_model_runs(cfg):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    model = build_model(cfg)
    assert model.backbone.size_divisibility == 32
    batch = _synthetic_batch(64, 96, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()), losses
    model.eval()
    with torch.no_grad():
        out = model([{"image": b["image"], "height": 64, "width": 96} for b in batch])
    assert len(out) == 2
    for o in out:
        inst = o["instances"]
        assert inst.image_size == (64, 96)
        assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(inst.get_fields())
        assert len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
    return losses


@pytest.mark.parametrize("mixer,size", ALL)
def test_every_config_builds_and_runs(mixer, size):
    name = f"unified_{mixer}_{size}"
    if name not in stm_backbones.list_models():
        pytest.skip(f"{name} is not registered in stm_backbones (yet)")
    cfg = load_cfg(config_path(mixer, size), SMALL_OVERRIDES)
    _check_model_runs(cfg)


def test_demo_config_builds_and_runs():
    cfg = load_cfg(DEMO_CONFIG, SMALL_OVERRIDES)
    assert cfg.MODEL.UNIFIED.NAME == "unified_convnext_micro" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3
    assert tuple(cfg.DATASETS.TRAIN) == ("stm_shapes_train",) and tuple(cfg.DATASETS.TEST) == ("stm_shapes_val",)
    _check_model_runs(cfg)
