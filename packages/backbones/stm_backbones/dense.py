"""The detection ("dense") variant of every unified model (spec §5)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .checkpoint import load_into_dense_backbone
from .registry import STUDY_DETECTION_DROP_PATH, create_model, family_of


def detection_drop_path(name: str) -> float:
    """The stochastic depth of the study's detection configs: the family's value for the model's size; other
    models (`official_*`) by the size in their name, 0 when it names none."""
    found = family_of(name)
    if found:
        return found[0].detection_drop_path(found[1])
    return STUDY_DETECTION_DROP_PATH.get(name.rsplit("_", 1)[-1], 0.0)


def create_dense_backbone(name: str, out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float | None = None,
                          pretrained: str | os.PathLike | None = None, **kwargs):
    """A unified model's detection trunk: `forward(images)` returns normalised NCHW maps at strides
    4, 8, 16, 32 for `out_indices`; any input whose sides are multiples of 32 works.

    `drop_path_rate`: None takes the study's detection value for the model's size (`detection_drop_path`).
    `pretrained`: a classification checkpoint (ours or the study's) loaded by the detection rules.
    """
    if drop_path_rate is None:
        drop_path_rate = detection_drop_path(name)
    model = create_model(name, dense=True, num_classes=0, out_indices=tuple(out_indices),
                         drop_path_rate=drop_path_rate, **kwargs)
    if pretrained:
        load_into_dense_backbone(model, pretrained)
    return model
