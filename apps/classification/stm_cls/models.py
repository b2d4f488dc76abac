"""Model creation through the timm registry (importing stm_backbones registers the unified models).

Everything the command line says about the model is applied here, in ``create_model``, so that
training, evaluation and ``predict.py`` build the same network from the same arguments:
``--drop_path``, ``--pretrained``/``--pretrained_path``, ``--grad_checkpointing``, ``--model_kwargs``,
``--head_init_scale``, ``--layer_scale_init_value`` and ``--input_size``.
"""

from __future__ import annotations

import inspect
import os
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


class ModelConfigError(ValueError):
    """Model arguments that cannot be applied (unknown --model_kwargs key, no pretrained weights, ...)."""


def study_models() -> list[str]:
    return sorted(timm.list_models("unified_*") + timm.list_models("official_*"))


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        names = study_models()
        listing = ", ".join(names) if names else "none registered (is stm_backbones installed?)"
        raise UnknownModelError(f"unknown model '{name}'. Available study models: {listing}. "
                                f"Any timm model name also works (see timm.list_models()).")


def pretrained_cfg_of(name: str) -> dict:
    """The registered default pretrained_cfg of a model name as a dict ({} when there is none).

    Read from the registry without building the model, so that the data transforms can use it
    before the model exists.
    """
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except Exception:  # noqa: BLE001 - an unknown name is reported later, by create_model
        return {}
    return cfg.to_dict() if cfg is not None else {}


def input_size_error(model: torch.nn.Module, size: int) -> str | None:
    """Why the model, built for ``size`` x ``size`` images, cannot take them (its mixer block's
    ``input_size_error`` rule, the mixer contract); None when it can or when the model has no rule."""
    rule = getattr(getattr(model, "block_type", None), "input_size_error", None)
    return None if rule is None else rule(size, size, size, False)


def sizes_that_work(model: torch.nn.Module, size: int, count: int = 4, *, larger_only: bool = False,
                    multiple_of: int = 1) -> list[int]:
    """The square sizes nearest to ``size`` (only larger ones with ``larger_only``; multiples of ``multiple_of``;
    at least 32) that the model accepts when built for them, sorted: asks the mixer block's ``input_size_error``
    rule (the mixer contract); empty for models without one. Used by the training's input-size check and by the
    study's per-model input size."""
    if getattr(getattr(model, "block_type", None), "input_size_error", None) is None:
        return []
    found: list[int] = []
    for step in range(1, 8 * size + 4096):
        for candidate in (size + step,) if larger_only else (size - step, size + step):
            if (candidate >= 32 and candidate % multiple_of == 0 and len(found) < count
                    and input_size_error(model, candidate) is None):
                found.append(candidate)
        if len(found) >= count:
            break
    return sorted(found)


def max_drop_path_rate(model: torch.nn.Module) -> float:
    """Largest stochastic-depth probability in the model (timm's DropPath modules; Identity = 0)."""
    return max((float(m.drop_prob) for m in model.modules() if hasattr(m, "drop_prob")), default=0.0)


def _check_meta_arch_kwargs(model: torch.nn.Module, model_kwargs: dict) -> None:
    """The study's MetaArch swallows unknown keyword arguments (**_ignored, for timm's extras), so a
    misspelt --model_kwargs key would silently do nothing there: refuse it by name."""
    cls = type(model)
    if cls.__name__ != "MetaArch":
        return
    params = inspect.signature(cls.__init__).parameters
    accepted = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
    unknown = sorted(set(model_kwargs) - accepted)
    if unknown:
        raise ModelConfigError(f"--model_kwargs: {', '.join(unknown)} not accepted by {cls.__name__} "
                               f"(accepted: {', '.join(sorted(accepted))})")


def _scale_head(model: torch.nn.Module, scale: float) -> None:
    """ConvNeXt's --head_init_scale: multiply the freshly initialised classifier's weight and bias."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear):
        raise ModelConfigError(f"--head_init_scale {scale}: model has no linear classifier head "
                               f"(get_classifier() returned {type(head).__name__})")
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)


def _create_pretrained(name: str, path: str, num_classes: int, kwargs: dict) -> torch.nn.Module:
    """timm's pretrained path: weights from the model's pretrained_cfg, or from ``path`` through
    ``pretrained_cfg_overlay=dict(file=path)``; the classifier is re-initialised when the class count
    differs from the pretrained weights' (num_classes in the pretrained_cfg)."""
    cfg_classes = int(pretrained_cfg_of(name).get("num_classes") or 0)
    overlay = dict(file=path) if path else None
    if path and not path.startswith(("http://", "https://")):
        if not os.path.isfile(path):
            raise ModelConfigError(f"--pretrained_path: file not found: {path}")
    # Build with the weights' own class count so that every stored tensor, head included, loads
    # strictly; then replace the head if this run has another number of classes.
    build_classes = cfg_classes if cfg_classes > 0 else num_classes
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=build_classes,
                                  **kwargs)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = (f" (--pretrained_path expects the pretrained format, {build_classes} classes; for a checkpoint "
                f"with another class count use --finetune)") if path else ""
        raise ModelConfigError(f"--pretrained{'_path ' + path if path else ''}: cannot load weights for "
                               f"'{name}': {first}{hint}") from None
    if build_classes != num_classes:
        print(f"Pretrained weights have {build_classes} classes, this run {num_classes}: classifier re-initialised")
        model.reset_classifier(num_classes)
    return model


def create_model(args) -> torch.nn.Module:
    """timm.create_model with the study's constructor arguments and the model flags.

    drop_path_rate is passed only with --drop_path: by default each factory's own per-size
    stochastic-depth rate is used, as in the study (micro 0.0; tiny 0.1/0.2; small 0.3/0.4; base 0.5).
    layer_scale_init_value and img_size only exist on the study's models.
    """
    check_model_name(args.model)
    kwargs = {}
    if args.model.startswith(STUDY_PREFIXES):
        kwargs.update(layer_scale_init_value=args.layer_scale_init_value, img_size=args.input_size)
    drop_path = getattr(args, "drop_path", None)
    if drop_path is not None:
        if not 0.0 <= drop_path < 1.0:
            raise ModelConfigError(f"--drop_path must be in [0, 1), got {drop_path}")
        kwargs["drop_path_rate"] = drop_path
    model_kwargs = dict(getattr(args, "model_kwargs", None) or {})
    kwargs.update(model_kwargs)
    pretrained_path = getattr(args, "pretrained_path", "") or ""
    try:
        if getattr(args, "pretrained", False) or pretrained_path:
            model = _create_pretrained(args.model, pretrained_path, args.nb_classes, kwargs)
        else:
            model = timm.create_model(args.model, pretrained=False, num_classes=args.nb_classes, **kwargs)
    except TypeError as exc:  # a keyword the constructor does not take
        given = f"--model_kwargs {' '.join(f'{k}={v!r}' for k, v in model_kwargs.items())}: " if model_kwargs else ""
        raise ModelConfigError(f"{given}cannot build '{args.model}': {exc}") from None
    _check_meta_arch_kwargs(model, model_kwargs)

    if getattr(args, "head_init_scale", 1.0) != 1.0:
        _scale_head(model, args.head_init_scale)
    if getattr(args, "grad_checkpointing", False):
        if not hasattr(model, "set_grad_checkpointing"):
            raise ModelConfigError(f"--grad_checkpointing: '{args.model}' has no set_grad_checkpointing()")
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, RuntimeError) as exc:
            raise ModelConfigError(f"--grad_checkpointing: not supported by '{args.model}' ({exc})") from None
    return model
