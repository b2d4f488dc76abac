"""Detectron2 backbones over the dense ("detection") variant of the unified models.

``build_unified_fpn_backbone`` (MODEL.BACKBONE.NAME) feeds the trunk's stride-4..32 maps into a
standard detectron2 FPN (P2-P6, the extra P6 from a max-pool of P5, as in Mask R-CNN R50-FPN).
``build_unified_backbone`` returns the bare trunk for heads that do not need an FPN.
"""

from __future__ import annotations

import logging

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

import stm_backbones

logger = logging.getLogger(__name__)

__all__ = ["UnifiedBackbone", "build_unified_backbone", "build_unified_fpn_backbone"]


class UnifiedBackbone(Backbone):
    """Wraps ``stm_backbones.create_dense_backbone(name)``: images NCHW (sides multiples of 32) in,
    a dict ``{out_feature: NCHW map}`` out, with strides 4, 8, 16, 32 for stages 0..3."""

    def __init__(self, name: str, out_indices=(0, 1, 2, 3), out_features=("res2", "res3", "res4", "res5"),
                 drop_path_rate: float | None = None, pretrained: str | None = None, compile: bool = False,
                 layer_scale_init_value: float | None = None):
        super().__init__()
        out_indices = tuple(int(i) for i in out_indices)
        out_features = tuple(out_features)
        if len(out_indices) != len(out_features):
            raise ValueError(f"MODEL.UNIFIED.OUT_INDICES {out_indices} and OUT_FEATURES {out_features} "
                             "must have the same length")
        if list(out_indices) != sorted(set(out_indices)) or not all(0 <= i <= 3 for i in out_indices):
            raise ValueError(f"MODEL.UNIFIED.OUT_INDICES must be increasing stage indices in 0..3, got {out_indices}")
        available = stm_backbones.list_models()
        if name not in available:
            raise ValueError(f"MODEL.UNIFIED.NAME {name!r} is not a registered model; available: {', '.join(available)}")
        extra = {} if layer_scale_init_value is None else {"layer_scale_init_value": float(layer_scale_init_value)}
        self.body = stm_backbones.create_dense_backbone(
            name, out_indices=out_indices, drop_path_rate=drop_path_rate, pretrained=pretrained or None, **extra)
        if pretrained:
            logger.info("Loaded the classification checkpoint %s into %s", pretrained, name)
        if compile:
            # In place, so that state_dict keys (and therefore checkpoints) are unchanged. Static shapes:
            # Inductor (torch 2.14, CPU) fails on the channels-last maps of a graph with symbolic height and
            # width ("cannot determine truth value of Relational"), so each padded input size gets its own
            # graph; past torch._dynamo.config.recompile_limit sizes, new sizes run eagerly.
            self.body.compile(dynamic=False)
        self._out_indices = out_indices
        self._out_features = list(out_features)
        dims = list(self.body.dims)
        self._out_feature_channels = {f: int(dims[i]) for f, i in zip(out_features, out_indices)}
        self._out_feature_strides = {f: 4 * 2 ** i for f, i in zip(out_features, out_indices)}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"UnifiedBackbone takes NCHW images, got shape {tuple(x.shape)}")
        outs = self.body(x)
        return dict(zip(self._out_features, outs))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f], stride=self._out_feature_strides[f])
                for f in self._out_features}


def _unified_from_cfg(cfg, input_shape: ShapeSpec) -> UnifiedBackbone:
    if input_shape.channels != 3:
        raise ValueError(f"Unified backbones take 3-channel images, got {input_shape.channels} channels")
    u = cfg.MODEL.UNIFIED
    return UnifiedBackbone(u.NAME, out_indices=u.OUT_INDICES, out_features=u.OUT_FEATURES,
                           drop_path_rate=u.DROP_PATH_RATE, pretrained=u.PRETRAINED or None, compile=u.COMPILE,
                           layer_scale_init_value=u.LAYER_SCALE_INIT_VALUE)


@BACKBONE_REGISTRY.register()
def build_unified_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """The bare trunk (no FPN)."""
    return _unified_from_cfg(cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_unified_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Trunk + FPN (MODEL.FPN.OUT_CHANNELS channels, outputs p2..p5 and p6 = maxpool(p5))."""
    bottom_up = _unified_from_cfg(cfg, input_shape)
    missing = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in bottom_up.output_shape()]
    if missing:
        raise ValueError(f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} names {missing}, which "
                         f"MODEL.UNIFIED.OUT_FEATURES {list(cfg.MODEL.UNIFIED.OUT_FEATURES)} does not produce")
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
