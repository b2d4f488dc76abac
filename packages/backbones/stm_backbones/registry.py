"""Registration of this package's models with timm, and a `create_model` that explains unknown names."""

from __future__ import annotations

import difflib

import timm
from timm.models import register_model as _timm_register_model

_OUR_MODELS: set[str] = set()


def register_model(fn):
    """timm's `register_model`, also recording the name as one of this package's models."""
    _OUR_MODELS.add(fn.__name__)
    return _timm_register_model(fn)


def list_models() -> list[str]:
    """Every model this package registers with timm, sorted."""
    return sorted(_OUR_MODELS)


def check_model_name(name: str) -> None:
    if name in _OUR_MODELS or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, sorted(_OUR_MODELS), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model '{name}'.{hint} Available models: {', '.join(list_models())}")


def create_model(name: str, **kwargs):
    """`timm.create_model` with a clear error listing the available models for unknown names."""
    check_model_name(name)
    return timm.create_model(name, **kwargs)
