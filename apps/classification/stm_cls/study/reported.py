"""The study's published figures for its released checkpoints (ImageNet-1k top-1; COCO Mask R-CNN 1x box /
mask AP on val2017), as listed in the repository README. They are placed beside our own numbers for the
same model in the report; they are not re-measured here."""

from __future__ import annotations

# model: (ImageNet top-1, COCO box AP, COCO mask AP)
STUDY_FIGURES: dict[str, tuple[float, float, float]] = {
    "unified_halo_micro": (75.8, 40.3, 37.3),
    "unified_halo_tiny": (83.0, 46.9, 42.4),
    "unified_halo_small": (84.0, 48.2, 43.3),
    "unified_halo_base": (84.6, 49.0, 43.8),
    "unified_pvt_micro": (72.8, 35.9, 34.2),
    "unified_pvt_tiny": (82.1, 44.2, 40.6),
    "unified_pvt_small": (83.2, 46.1, 41.9),
    "unified_pvt_base": (83.4, 46.4, 42.3),
    "unified_swin_micro": (74.4, 36.6, 34.6),
    "unified_swin_tiny": (82.3, 44.3, 40.5),
    "unified_swin_small": (83.3, 46.4, 42.1),
    "unified_swin_base": (83.7, 47.0, 42.2),
    "unified_convnext_micro": (75.1, 39.2, 36.4),
    "unified_convnext_tiny": (82.2, 44.3, 40.5),
    "unified_convnext_small": (83.1, 45.6, 41.2),
    "unified_convnext_base": (83.7, 46.7, 42.2),
    "unified_dcn_v3_micro": (75.3, 39.5, 36.6),
    "unified_dcn_v3_tiny": (83.3, 47.2, 42.5),
    "unified_dcn_v3_small": (84.1, 47.8, 43.0),
    "unified_dcn_v3_base": (84.5, 48.7, 43.8),
}


def study_figures(model: str) -> dict | None:
    row = STUDY_FIGURES.get(model)
    if row is None:
        return None
    return {"imagenet_top1": row[0], "coco_box_ap": row[1], "coco_mask_ap": row[2]}
