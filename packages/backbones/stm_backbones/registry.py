"""The registry: the one source for the set of mixers ("families"), their sizes and models.

`register_mixer("pool", PoolBlock, SIZES)` registers `unified_pool_{size}` with timm for every row of the
size table; tests, `summary --all`, the detection config generator and the detection drop-path table
derive from `list_families()`. Models that are not one family x one size (the original macro designs,
`official_*`) are registered one by one with this module's `register_model`.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import timm
from timm.models import generate_default_cfgs
from timm.models import register_model as _timm_register_model

_OUR_MODELS: set[str] = set()
_FAMILIES: dict[str, MixerFamily] = {}

# Stochastic depth of the study's detection configs, by size name (the same for every mixer); a size table row
# may set its own with the key `detection_drop_path_rate`.
STUDY_DETECTION_DROP_PATH = {"micro": 0.1, "tiny": 0.2, "small": 0.2, "base": 0.3, "large": 0.3}


@dataclass(frozen=True)
class MixerFamily:
    """One registered mixer: its block class and size table (rows: MetaArch arguments such as dims, depths,
    drop_path_rate, and per-size block arguments such as num_heads), the family-wide block arguments."""

    name: str
    block_type: type
    sizes: Mapping[str, Mapping[str, Any]]
    block_kwargs: Mapping[str, Any] = field(default_factory=dict)
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    study: bool = False  # one of the study's five mixers

    def model_name(self, size: str) -> str:
        return f"unified_{self.name}_{size}"

    def models(self) -> list[str]:
        return [self.model_name(size) for size in self.sizes]

    @property
    def smallest(self) -> str:
        """The first size of the table (the tests' micro model)."""
        return self.model_name(next(iter(self.sizes)))

    def detection_drop_path(self, size: str) -> float:
        row = self.sizes[size]
        if "detection_drop_path_rate" in row:
            return float(row["detection_drop_path_rate"])
        return STUDY_DETECTION_DROP_PATH.get(size, 0.0)

    def model_args(self, size: str) -> dict[str, Any]:
        """MetaArch arguments of one size: the row's MetaArch keys, the rest of the row as block arguments."""
        from .meta_arch import MetaArch

        arch_keys = set(inspect.signature(MetaArch.__init__).parameters)
        row = {k: v for k, v in self.sizes[size].items() if k != "detection_drop_path_rate"}
        block_kwargs = {**self.block_kwargs, **{k: v for k, v in row.items() if k not in arch_keys}}
        args = dict(img_size=224, block_type=self.block_type, block_kwargs=block_kwargs, **self.model_kwargs)
        args.update({k: v for k, v in row.items() if k in arch_keys})
        return args


def register_model(fn):
    """timm's `register_model`, also recording the name as one of this package's models."""
    _OUR_MODELS.add(fn.__name__)
    return _timm_register_model(fn)


def register_mixer(name: str, block_type: type, sizes: Mapping[str, Mapping[str, Any]], *,
                   block_kwargs: Mapping[str, Any] | None = None, model_kwargs: Mapping[str, Any] | None = None,
                   pretrained_cfg: Callable[[str], dict] | Mapping[str, Any] | None = None,
                   study: bool = False) -> MixerFamily:
    """Register a mixer family: one timm model `unified_{name}_{size}` per row of `sizes`.

    `block_type`: a `stm_backbones.MixerBlock` subclass. `sizes`: {size: row}; a row's keys that are MetaArch
    arguments (dims, depths, drop_path_rate, ...) go to MetaArch, the others (num_heads, ...) to the blocks
    along with the family-wide `block_kwargs`. `pretrained_cfg`: extra pretrained_cfg fields, or a function of
    the size giving them. Keyword arguments of `timm.create_model` override everything (`img_size`,
    `drop_path_rate`, `num_classes`, even `block_kwargs`).
    """
    from ._builder import build_model, study_cfg
    from .mixer import MixerBlock

    if not (isinstance(block_type, type) and issubclass(block_type, MixerBlock)):
        raise TypeError(f"register_mixer('{name}'): block_type must be a subclass of stm_backbones.MixerBlock, "
                        f"got {block_type!r}")
    if not name.isidentifier() or not sizes:
        raise ValueError(f"register_mixer: need an identifier-like name and at least one size, got {name!r}, "
                         f"{list(sizes)}")
    family = MixerFamily(name, block_type, dict(sizes), dict(block_kwargs or {}), dict(model_kwargs or {}), study)
    module = sys.modules[block_type.__module__]
    cfgs = getattr(module, "default_cfgs", None)
    if cfgs is None:
        cfgs = module.default_cfgs = {}
    for size in sizes:
        model = family.model_name(size)
        extra = pretrained_cfg(size) if callable(pretrained_cfg) else dict(pretrained_cfg or {})
        cfgs.update(generate_default_cfgs({model: study_cfg(extra.pop("study_filename", None), **extra)}))

        def entrypoint(pretrained: bool = False, _size: str = size, _model: str = model, **kwargs):
            return build_model(_model, pretrained, **{**family.model_args(_size), **kwargs})

        entrypoint.__name__ = entrypoint.__qualname__ = model
        entrypoint.__module__ = block_type.__module__
        entrypoint.__doc__ = f"{model}: the {name} mixer in the unified architecture, size '{size}'."
        setattr(module, model, entrypoint)
        register_model(entrypoint)
    _FAMILIES[name] = family
    return family


def list_models() -> list[str]:
    """Every model this package registers with timm, sorted."""
    return sorted(_OUR_MODELS)


def list_families(study: bool | None = None) -> list[MixerFamily]:
    """The registered mixer families in registration order (`study=True`: the study's five only)."""
    return [f for f in _FAMILIES.values() if study is None or f.study == study]


def get_family(name: str) -> MixerFamily:
    if name not in _FAMILIES:
        raise KeyError(f"unknown mixer family {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of(model_name: str) -> tuple[MixerFamily, str] | None:
    """(family, size) of a registered family model name, None for other models."""
    for family in _FAMILIES.values():
        for size in family.sizes:
            if family.model_name(size) == model_name:
                return family, size
    return None


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
