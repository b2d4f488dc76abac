"""Mask R-CNN + FPN 1x on COCO with unified_convnext_micro (drop path 0.1), as a LazyConfig; the yacs
twin is ``../mask_rcnn_unified_convnext_micro_fpn_1x_coco.yaml``. Box / mask AP reported by the study
(COCO val2017): 39.2 / 36.4."""

from .mask_rcnn_unified_fpn_1x_coco import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.name = "unified_convnext_micro"
model.backbone.bottom_up.drop_path_rate = 0.1
train.output_dir = "./output/detection/lazy_mask_rcnn_unified_convnext_micro_fpn_1x_coco"

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
