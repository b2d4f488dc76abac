"""Unified spatial-token-mixer backbones, registered as timm models on import.

    import timm, stm_backbones
    model = timm.create_model("unified_swin_tiny", num_classes=1000)

A new mixer: subclass `MixerBlock`, then `register_mixer("name", Block, SIZES)` (README, "Adding a new token
mixer"); `fast_paths` switches the blocks' fast kernels off and on.
"""

from __future__ import annotations

from . import (
    fast_paths,
    models,  # noqa: F401  (registers every model with timm)
)
from .checkpoint import CheckpointMismatchError, load_checkpoint, load_into_dense_backbone
from .dense import create_dense_backbone
from .meta_arch import MetaArch
from .mixer import MixerBlock, per_stage
from .plugins import load_plugins
from .registry import MixerFamily, create_model, family_of, get_family, list_families, list_models, register_mixer

__version__ = "0.1.0"
__all__ = [
    "CheckpointMismatchError", "MetaArch", "MixerBlock", "MixerFamily", "create_dense_backbone", "create_model",
    "family_of", "fast_paths", "get_family", "list_families", "list_models", "load_checkpoint",
    "load_into_dense_backbone", "per_stage", "register_mixer",
]

load_plugins()
