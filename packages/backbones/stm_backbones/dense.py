"""The detection ("dense") variant of every unified model (spec §5)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .checkpoint import load_into_dense_backbone
from .registry import create_model

# Stochastic depth of the study's detection configs, per size (every mixer).
DETECTION_DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3, "large": 0.3}


def create_dense_backbone(name: str, out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float | None = None,
                          pretrained: str | os.PathLike | None = None, **kwargs):
    """A unified model's detection trunk: `forward(images)` returns normalised NCHW maps at strides
    4, 8, 16, 32 for `out_indices`; any input whose sides are multiples of 32 works.

    `pretrained`: a classification checkpoint (ours or the study's) loaded by the detection rules.
    """
    if drop_path_rate is None:
        drop_path_rate = DETECTION_DROP_PATH.get(name.rsplit("_", 1)[-1], 0.0)
    model = create_model(name, dense=True, num_classes=0, out_indices=tuple(out_indices),
                         drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        load_into_dense_backbone(model, pretrained)
    return model
