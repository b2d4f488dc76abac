"""Detectron2 project for the unified spatial-token-mixer backbones (Mask R-CNN + FPN).

Importing the package registers the backbones ``build_unified_fpn_backbone`` and
``build_unified_backbone`` in detectron2's BACKBONE_REGISTRY.
"""

from .backbone import UnifiedBackbone, build_unified_backbone, build_unified_fpn_backbone
from .checkpoint import AtomicCheckpointer, CheckpointError
from .config import DEFAULT_NO_DECAY_KEYS, STUDY_MMDET_NO_DECAY_KEYS, ConfigError, add_unified_config, load_config

__all__ = [
    "DEFAULT_NO_DECAY_KEYS", "STUDY_MMDET_NO_DECAY_KEYS", "AtomicCheckpointer", "CheckpointError", "ConfigError",
    "UnifiedBackbone",
    "add_unified_config", "build_unified_backbone", "build_unified_fpn_backbone", "load_config",
]
