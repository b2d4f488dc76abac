"""Unified spatial-token-mixer backbones, registered as timm models on import.

    import timm, stm_backbones
    model = timm.create_model("unified_swin_tiny", num_classes=1000)
"""

from __future__ import annotations

from . import models  # noqa: F401  (registers every model with timm)
from .checkpoint import CheckpointMismatchError, load_checkpoint, load_into_dense_backbone
from .dense import create_dense_backbone
from .meta_arch import MetaArch
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = [
    "CheckpointMismatchError", "MetaArch", "create_dense_backbone", "create_model", "list_models",
    "load_checkpoint", "load_into_dense_backbone",
]
