"""Model creation through the timm registry (importing stm_backbones registers the unified models)."""

from __future__ import annotations

import sys

import timm
import torch

STUDY_PREFIXES = ("unified_", "official_")


def import_backbones() -> bool:
    """Register the unified backbones with timm; other timm models work without them."""
    try:
        import stm_backbones  # noqa: F401
        return True
    except ImportError as exc:
        print(f"WARNING: stm_backbones is not importable ({exc}); only stock timm models are available",
              file=sys.stderr)
        return False


class UnknownModelError(ValueError):
    pass


def study_models() -> list[str]:
    return sorted(timm.list_models("unified_*") + timm.list_models("official_*"))


def create_model(args) -> torch.nn.Module:
    """timm.create_model with the study's constructor arguments.

    drop_path_rate is not passed: as in the reference, each factory's own stochastic-depth rate is used.
    layer_scale_init_value and img_size only exist on the study's models.
    """
    if not timm.is_model(args.model):
        names = study_models()
        listing = ", ".join(names) if names else "none registered (is stm_backbones installed?)"
        raise UnknownModelError(f"unknown model '{args.model}'. Available study models: {listing}. "
                                f"Any timm model name also works (see timm.list_models()).")
    kwargs = dict(pretrained=False, num_classes=args.nb_classes)
    if args.model.startswith(STUDY_PREFIXES):
        kwargs.update(layer_scale_init_value=args.layer_scale_init_value, img_size=args.input_size)
    return timm.create_model(args.model, **kwargs)
