"""Turns a family's size table into registered timm models (pretrained_cfg, features_only)."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg
from timm.models._builder import pretrained_cfg_for_features
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet
from timm.models._features_fx import FeatureGraphNet
from timm.models._input import get_model_traits

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


def _nhwc(features):
    if isinstance(features, dict):
        return type(features)((k, v.permute(0, 2, 3, 1)) for k, v in features.items())
    return [f.permute(0, 2, 3, 1) for f in features]


class HookFeatures(FeatureHookNet):
    """timm's FeatureHookNet (forward hooks on the stage norms, the model left intact) with output_fmt honoured."""

    def __init__(self, model, out_indices=(0, 1, 2, 3), out_map=None, return_dict: bool = False,
                 output_fmt: str = "NCHW", **kwargs):
        super().__init__(model, out_indices=out_indices, out_map=out_map, return_dict=return_dict, **kwargs)
        self.output_fmt = output_fmt

    def forward(self, x):
        out = super().forward(x)
        return _nhwc(out) if self.output_fmt == "NHWC" else out


class DictFeatures(HookFeatures):
    """feature_cls='dict': the hooked features as an ordered dict keyed by module name (or `out_map`), as timm's
    FeatureDictNet returns them. (FeatureDictNet itself re-runs the model's children in order, which the
    stage-interleaved MetaArch does not allow.)"""

    def __init__(self, model, out_indices=(0, 1, 2, 3), out_map=None, output_fmt: str = "NCHW", **kwargs):
        kwargs.pop("return_dict", None)
        super().__init__(model, out_indices=out_indices, out_map=out_map, return_dict=True, output_fmt=output_fmt,
                         **kwargs)


class GraphFeatures(FeatureGraphNet):
    """timm's FeatureGraphNet (a torch.fx graph cut at the stage norms) with output_fmt honoured."""

    def forward(self, x):
        out = super().forward(x)
        return _nhwc(out) if self.output_fmt == "NHWC" else out


FEATURE_CLASSES = {"getter": FeatureGetterNet, "hook": HookFeatures, "list": HookFeatures, "dict": DictFeatures,
                   "fx": GraphFeatures}
# timm's own classes that rebuild the model from its children in order map to the hook-based equivalents
_TIMM_CLASS_MAP = {FeatureListNet: HookFeatures, FeatureHookNet: HookFeatures, FeatureDictNet: DictFeatures,
                   FeatureGraphNet: GraphFeatures}


def wrap_features(model, pretrained_cfg: dict, out_indices=(0, 1, 2, 3), feature_cls="getter", **feature_kwargs):
    """The features_only wrapper: 'getter' (default: `forward_intermediates`), 'hook', 'list', 'dict' or 'fx' (or
    a class). Every kind returns the same maps: each stage's output after its stage norm (what the next stage
    sees; `norm=False` with the getter gives the raw stage outputs). `output_fmt` 'NCHW' or 'NHWC'."""
    if isinstance(out_indices, int):
        out_indices = tuple(range(4))[-out_indices:]
    if isinstance(feature_cls, str):
        key = feature_cls.lower()
        if key not in FEATURE_CLASSES:
            raise ValueError(f"unknown feature_cls {feature_cls!r}; use one of {', '.join(FEATURE_CLASSES)}")
        cls = FEATURE_CLASSES[key]
    else:
        cls = _TIMM_CLASS_MAP.get(feature_cls, feature_cls)
    output_fmt = str(getattr(feature_kwargs.get("output_fmt"), "value", feature_kwargs.get("output_fmt") or "NCHW"))
    if output_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
    feature_kwargs["output_fmt"] = output_fmt
    if isinstance(cls, type) and issubclass(cls, FeatureGetterNet):
        feature_kwargs.setdefault("norm", True)
    elif "norm" in feature_kwargs:
        if not feature_kwargs.pop("norm"):
            raise ValueError("norm=False (raw stage outputs) needs feature_cls='getter'; the hook/dict/fx features "
                             "are the stage-norm outputs")
    for key in ("flatten_sequential", "no_rewrite"):
        feature_kwargs.pop(key, None)
    traits = get_model_traits(model)
    features = cls(model, out_indices=tuple(out_indices), **feature_kwargs)
    features._traits = dict(model._traits) if hasattr(model, "_traits") else {}
    if "in_chans" in traits:
        features.in_chans = traits["in_chans"]
    features.pretrained_cfg = pretrained_cfg_for_features(pretrained_cfg)
    features.default_cfg = features.pretrained_cfg
    return features


def build_model(variant: str, pretrained: bool = False, **kwargs: Any):
    """Build a MetaArch model through timm's builder, then load weights and wrap for features.

    Weights are loaded with our own loader (`checkpoint.load_checkpoint`, fine-tuning rules: a classifier that
    does not fit num_classes is re-initialised, the stem adapted to in_chans) rather than timm's, because the
    study's checkpoints are training-script dicts (`{'model': ..., 'args': Namespace, ...}`) that need the study's
    interpolation rules. `checkpoint_ema=True` loads the file's EMA weights, `checkpoint_sha256` checks the file;
    both also apply to a later `timm.create_model(..., checkpoint_path=...)`.
    """
    features_only = kwargs.pop("features_only", False)
    checkpoint_ema = bool(kwargs.pop("checkpoint_ema", False))
    checkpoint_sha256 = kwargs.pop("checkpoint_sha256", None)
    feature_kwargs = {}
    if features_only:
        feature_kwargs = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls", "output_fmt", "norm", "out_map",
                                                     "flatten_sequential", "no_rewrite", "return_dict")
                          if k in kwargs}
        feature_kwargs.update(kwargs.pop("feature_cfg", None) or {})
    model = build_model_with_cfg(MetaArch, variant, pretrained=False, **kwargs)
    model.checkpoint_ema = checkpoint_ema
    model.checkpoint_sha256 = checkpoint_sha256
    if pretrained:
        from .checkpoint import load_checkpoint

        cfg = model.pretrained_cfg
        source = cfg.get("file") or cfg.get("url") or cfg.get("state_dict")
        if source is None or (isinstance(source, str) and not source):
            released = study_filename(cfg)
            where = f"The study released them as '{released}'; load that file" if released else "Load a checkpoint"
            raise RuntimeError(
                f"no weights are hosted for '{variant}'. {where} with "
                f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file=PATH_OR_URL))")
        load_checkpoint(model, source, use_ema=checkpoint_ema, sha256=checkpoint_sha256, finetune=True)
    if features_only:
        model = wrap_features(model, model.pretrained_cfg, **feature_kwargs)
    return model


def _load_checkpoint_path(model, checkpoint_path, *args, **kwargs):
    """`timm.create_model(..., checkpoint_path=...)` for our models: the same rules as every other load path
    (`model` weights unless the model was created with checkpoint_ema=True, weights-only, prefixes stripped,
    the checkpoint_sha256 checked, non-finite weights refused), strict. Other models keep timm's loader."""
    inner = model
    for attr in ("model", "body"):  # feature wrappers
        if not isinstance(inner, MetaArch) and isinstance(getattr(inner, attr, None), MetaArch):
            inner = getattr(inner, attr)
    if not isinstance(inner, MetaArch):
        return _TIMM_LOAD_CHECKPOINT(model, checkpoint_path, *args, **kwargs)
    from .checkpoint import load_checkpoint

    return load_checkpoint(inner, checkpoint_path, use_ema=getattr(inner, "checkpoint_ema", False),
                           sha256=getattr(inner, "checkpoint_sha256", None),
                           strict=kwargs.get("strict", True))


# timm.create_model(checkpoint_path=...) calls the `load_checkpoint` name of timm's factory module, which prefers EMA
# weights; our models route to our loader so that one rule holds everywhere (see checkpoint.py).
import timm.models._factory as _timm_factory  # noqa: E402

_TIMM_LOAD_CHECKPOINT = getattr(_timm_factory.load_checkpoint, "_stm_original", _timm_factory.load_checkpoint)
_load_checkpoint_path._stm_original = _TIMM_LOAD_CHECKPOINT
_timm_factory.load_checkpoint = _load_checkpoint_path
