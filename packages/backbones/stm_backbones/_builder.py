"""Turns a family's size table into registered timm models (pretrained_cfg, features_only)."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models._features import FeatureGetterNet

from .meta_arch import MetaArch

STUDY_LICENSE = "apache-2.0"
STUDY_PAPER = "Demystify Transformers & Convolutions in Modern Image Deep Networks"


def study_filename(cfg: dict) -> str | None:
    """The study's released checkpoint file name recorded in a pretrained_cfg (see `study_cfg`)."""
    for note in cfg.get("notes") or ():
        if note.startswith("study_filename="):
            return note.split("=", 1)[1]
    return None


def study_cfg(filename: str | None, **overrides: Any) -> dict:
    """pretrained_cfg of one registered model. `filename` is the study's released checkpoint name.

    The study's files are not hosted on a hub: load one with
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH_OR_URL))`.
    """
    cfg = dict(
        url="", file=None, notes=(f"study_filename={filename}",) if filename else (), description=STUDY_PAPER,
        paper_name=STUDY_PAPER, num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7),
        crop_pct=0.875, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        first_conv="downsample_layers.0.stem.0", classifier="head", license=STUDY_LICENSE,
    )
    cfg.update(overrides)
    return cfg


def build_model(variant: str, pretrained: bool = False, **kwargs: Any):
    """Build a MetaArch model through timm's builder, then load weights and wrap for features.

    Weights are loaded with our own loader (`checkpoint.load_checkpoint`) rather than timm's, because
    the study's checkpoints are training-script dicts (`{'model': ..., 'args': Namespace, ...}`)
    that need the study's interpolation rules.
    """
    features_only = kwargs.pop("features_only", False)
    # out_indices selects the features_only outputs; without features_only it is a model argument
    # (the dense variant's outputs).
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3)) if features_only else None
    feature_kwargs = {k: kwargs.pop(k) for k in ("output_fmt", "norm") if k in kwargs}
    kwargs.pop("feature_cls", None)
    model = build_model_with_cfg(MetaArch, variant, pretrained=False, **kwargs)
    if pretrained:
        from .checkpoint import load_checkpoint

        cfg = model.pretrained_cfg
        source = cfg.get("file") or cfg.get("url")
        if not source:
            released = study_filename(cfg)
            where = f"The study released them as '{released}'; load that file" if released else "Load a checkpoint"
            raise RuntimeError(
                f"no weights are hosted for '{variant}'. {where} with "
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH_OR_URL))")
        load_checkpoint(model, source)
    if features_only:
        if isinstance(out_indices, int):
            out_indices = tuple(range(4))[-out_indices:]
        model = FeatureGetterNet(model, out_indices=out_indices, **feature_kwargs)
    return model
