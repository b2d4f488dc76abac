"""Mask R-CNN + FPN 1x on COCO with a unified backbone, as a detectron2 LazyConfig: the same recipe as
``../Base-Unified-MaskRCNN-FPN-1x.yaml`` (see the comments there for the why of each value).

    python apps/detection/train_net.py --config-file apps/detection/configs/lazy/mask_rcnn_unified_convnext_micro_fpn_1x_coco.py \
        --num-gpus 8 model.backbone.bottom_up.pretrained=/path/to/unified_convnext_micro.pth

Model configs import the five objects below and change the backbone (``model.backbone.bottom_up.name``,
``drop_path_rate``) and ``train.output_dir``.
"""

import os
import sys

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf
from torch.optim import AdamW

_APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _APP_DIR not in sys.path:  # stm_det, when the file is loaded from elsewhere than train_net.py
    sys.path.insert(0, _APP_DIR)

from stm_det.backbone import UnifiedBackbone  # noqa: E402
from stm_det.config import DEFAULT_NO_DECAY_KEYS  # noqa: E402
from stm_det.lazy import adamw_param_groups, lazy_evaluator, skip_bad_images  # noqa: E402

# ---- model: detectron2's Mask R-CNN FPN with the unified trunk as the FPN's bottom-up network --------
model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up = L(UnifiedBackbone)(
    name="unified_convnext_tiny",
    out_indices=(0, 1, 2, 3),
    out_features=["res2", "res3", "res4", "res5"],
    drop_path_rate=0.2,
    pretrained="",  # a classification checkpoint of the same model
    compile=False,
    layer_scale_init_value=None,
)
model.pixel_mean = [123.675, 116.28, 103.53]  # RGB, ImageNet statistics of the classification models
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
# The heads of common/models/mask_rcnn_fpn.py already are the recipe's: anchors 32-512 x (0.5, 1, 2),
# RPN 2000/1000 train and 1000/1000 test proposals, NMS 0.7, RoIAlignV2 7x7 / 14x14, 2x1024 FC box head,
# 512 RoIs with 25% positives, 4-conv mask head, test score 0.05, NMS 0.5, 100 detections.

# ---- data: single scale 800 / 1333, horizontal flip; unreadable training images skipped -----------
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train"),
    mapper=L(skip_bad_images)(
        mapper=L(DatasetMapper)(
            is_train=True,
            augmentations=[
                L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
                L(T.RandomFlip)(horizontal=True),
            ],
            image_format="RGB",
            use_instance_mask=True,
        ),
        max_bad=10,
    ),
    total_batch_size=16,
    num_workers=2,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333)],
        image_format="RGB",
    ),
    num_workers=2,
)
# COCO bbox (+ segm when the set has masks), or the evaluator of the dataset's type.
dataloader.evaluator = L(lazy_evaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}",
    mask_on=True,
    max_dets_per_image=100,
)

# ---- optimizer: AdamW 1e-4, wd 0.05, no decay on norms and on the mixer family's position tables -----
# (the study's mmdet list exactly: no_decay_keys=list(STUDY_MMDET_NO_DECAY_KEYS), no_decay_position_tables=False)
optimizer = L(AdamW)(
    params=L(adamw_param_groups)(model=None, weight_decay=0.05, no_decay_keys=list(DEFAULT_NO_DECAY_KEYS),
                                 no_decay_position_tables=True),
    lr=1e-4,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=0.05,
)

# ---- schedule: 12 epochs of 7330 iterations at batch 16, x0.1 after epochs 8 and 11, 1000-iter warmup -
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[58640, 80630], num_updates=87960),
    warmup_length=1000 / 87960,
    warmup_factor=0.001,
    warmup_method="linear",
)

train = get_config("common/train.py").train
train.max_iter = 87960
train.checkpointer = dict(period=7330, max_to_keep=100)
train.eval_period = 7330
train.log_period = 50
train.init_checkpoint = ""
train.device = "cuda"
train.seed = 0
# BestCheckpointer: metric "" (off) or a key of the evaluation results, e.g. "bbox/AP".
train.best_checkpoint = dict(metric="", mode="max")
train.output_dir = "./output/detection/lazy_mask_rcnn_unified_fpn_1x_coco"
