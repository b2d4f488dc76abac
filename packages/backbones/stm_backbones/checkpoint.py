"""Loading the study's checkpoints into our models.

`load_checkpoint` accepts a path, an https URL, a bare state_dict or a training-script dict
(`{'model': ..., 'model_ema': ..., 'optimizer': ..., 'args': Namespace, ...}`), applies the study's
loading rules (`adapt_state_dict`) and fails with one readable message when the checkpoint belongs
to another model (`CheckpointMismatchError`).

Rules shared by every load path (`load_checkpoint`, `load_into_dense_backbone`, `MetaArch.load_state_dict`,
`timm.create_model(..., pretrained=True)` and `timm.create_model(..., checkpoint_path=...)`):

* files and URLs are read with `torch.load(weights_only=True)` (nothing is unpickled but tensors, containers
  and the training script's `argparse.Namespace`); `trusted=True` is the explicit opt-out;
* which weights: `model` (the live weights, what the study evaluated and released; timm's `state_dict`)
  when the file has them; the EMA (`model_ema`, timm's `state_dict_ema`) when it is the only set of weights
  in the file, or when asked for with `use_ema=True` (through timm: `checkpoint_ema=True`);
* the `module.` (DistributedDataParallel) and `_orig_mod.` (torch.compile) key prefixes are stripped;
* `sha256` (full digest or a prefix of at least 8 hex digits) is checked when given, and a URL whose file
  name follows torch.hub's `name-<sha256 prefix>.ext` convention is checked against that prefix;
* weights that are NaN or infinite are refused (`NonFiniteWeightsError`, naming the tensors) unless
  `allow_non_finite=True`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import cache_root

_logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 5
_HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


class NonFiniteWeightsError(ValueError):
    """The checkpoint holds NaN or infinite weights."""


class ChecksumError(ValueError):
    """The checkpoint file's SHA-256 digest is not the expected one."""


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


# ---------------------------------------------------------------------------------- reading files
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """ChecksumError unless the file's SHA-256 starts with `expected` (a full digest or a prefix >= 8 digits)."""
    expected = expected.strip().lower()
    if len(expected) < 8 or not re.fullmatch(r"[0-9a-f]+", expected):
        raise ValueError(f"sha256 must be hexadecimal digits (at least 8), got {expected!r}")
    actual = _sha256(Path(path))
    if not actual.startswith(expected):
        raise ChecksumError(f"checkpoint {path} has SHA-256 {actual}, expected {expected}"
                            + ("..." if len(expected) < 64 else "") + ": the file is corrupt or not the one intended")


def _namespace_allowed():
    """A context allowing the training script's argparse.Namespace in weights-only loads. `safe_globals` removes
    what it added on exit, so it is only entered when Namespace is not already allowed process-wide (an app's
    add_safe_globals must survive our loads)."""
    if argparse.Namespace in torch.serialization.get_safe_globals():
        return contextlib.nullcontext()
    return torch.serialization.safe_globals([argparse.Namespace])


def _load_url(url: str, trusted: bool) -> Any:
    """Download once into ${STM_CACHE}/checkpoints (torch.hub: temp file, then rename) and load weights-only.
    A file name with torch.hub's `-<sha256 prefix>.` is checked against that prefix."""
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot tell a file name from the URL {url!r}")
    model_dir = Path(cache_root()) / "checkpoints"
    with _namespace_allowed():
        return torch.hub.load_state_dict_from_url(
            url, model_dir=str(model_dir), map_location="cpu", progress=True, file_name=name,
            check_hash=bool(_HUB_HASH.search(name)), weights_only=not trusted)


def read_checkpoint(source: str | os.PathLike, trusted: bool = False, sha256: str | None = None) -> Any:
    """torch.load a local file or an http(s) URL in weights-only mode (training-script dicts with their argparse
    Namespace included); other pickled objects need `trusted=True`. `sha256` is checked before loading."""
    text = str(source)
    is_url = text.startswith(("http://", "https://"))
    try:
        if is_url:
            path = Path(cache_root()) / "checkpoints" / Path(urllib.parse.urlparse(text).path).name
            checkpoint = _load_url(text, trusted)
            if sha256:
                verify_sha256(path, sha256)
            return checkpoint
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if sha256:
            verify_sha256(path, sha256)
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except (FileNotFoundError, ChecksumError, ValueError):
        raise
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        hint = "" if trusted else " (if you trust the file, pass trusted=True to unpickle arbitrary objects)"
        raise RuntimeError(f"could not read checkpoint {text}: {error}{hint}") from error


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Keys without the `module.` (DDP) and `_orig_mod.` (torch.compile) wrapper prefixes, in any nesting."""
    out = {}
    for key, value in state_dict.items():
        stripped = key
        while stripped.startswith(WRAPPER_PREFIXES):
            stripped = stripped.split(".", 1)[1]
        out[stripped] = value
    return out


def check_finite(state_dict: Mapping[str, Any], model: nn.Module | None = None, source: Any = None) -> None:
    """NonFiniteWeightsError naming the floating-point tensors that hold NaN or infinite values."""
    bad = []
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad.append(f"{key} ({int((~finite).sum())} of {value.numel()})")
    if bad:
        where = f" {source}" if source is not None else ""
        target = f" for '{model_name(model)}'" if model is not None else ""
        raise NonFiniteWeightsError(
            f"checkpoint{where}{target} holds NaN/infinite weights in {len(bad)} tensors: {_listing(bad)}. It was "
            "probably saved after training diverged; use an earlier checkpoint (allow_non_finite=True loads it anyway)")


_MODEL_KEYS = ("model", "state_dict", "module")
_EMA_KEYS = ("model_ema", "state_dict_ema")


def extract_state_dict(checkpoint: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint, by the rule in this module's docstring, without wrapper prefixes."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    chosen = None
    if use_ema:
        chosen = next((k for k in _EMA_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if chosen is None:
            raise CheckpointMismatchError(
                "use_ema=True, but the checkpoint has no EMA weights ('model_ema' / 'state_dict_ema'); its entries: "
                + _listing(sorted(str(k) for k in checkpoint)))
    else:
        chosen = next((k for k in _MODEL_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if chosen is None:
            chosen = next((k for k in _EMA_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        elif any(isinstance(checkpoint.get(k), Mapping) for k in _EMA_KEYS):
            _logger.info("loading the checkpoint's '%s' weights; it also holds EMA weights (use_ema=True loads "
                         "those)", chosen)
    if chosen is not None:
        checkpoint = checkpoint[chosen]
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor: "
                            "is this a state_dict?")
    return strip_prefixes(checkpoint)


# ---------------------------------------------------------------------------------- study rules
def _read_label_map(path: str | os.PathLike) -> torch.Tensor:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return torch.tensor([int(line) for line in lines], dtype=torch.long)


def _block_policy(model: nn.Module) -> type:
    from .mixer import block_policy

    block_type = getattr(model, "block_type", None)
    return block_policy(block_type) if isinstance(block_type, type) else block_policy(nn.Module)


def is_derived_buffer(model: nn.Module, key: str) -> bool:
    """Whether `key` is a buffer the model computes from its geometry (the family's `derived_buffers`): never
    loaded from a checkpoint, never required in one."""
    from .mixer import split_block_key

    parts = split_block_key(key)
    return parts is not None and parts[2] in _block_policy(model).derived_buffers


def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     label_map_path: str | None = None) -> dict[str, torch.Tensor]:
    """Apply the study's loading rules (spec §1.7) to a state_dict for `model`: the family's derived buffers are
    skipped, block tensors go through the family's `adapt_checkpoint_tensor` (e.g. tables interpolated to the
    model's window size), and a classifier of another size is subset with the label map, if any."""
    from .mixer import split_block_key

    own = model.state_dict()
    policy = _block_policy(model)
    label_map_path = label_map_path or getattr(model, "label_map_path", None)
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if is_derived_buffer(model, key):
            continue  # the model keeps the index/mask buffers it computed itself
        target = own.get(key)
        if target is not None:
            parts = split_block_key(key)
            if parts is not None:
                try:
                    value = policy.adapt_checkpoint_tensor(parts[2], value, target)
                except CheckpointMismatchError as error:
                    raise CheckpointMismatchError(f"checkpoint entry '{key}': {error}") from error
            elif key.startswith("head.") and value.shape[0] != target.shape[0] and label_map_path:
                value = value[_read_label_map(label_map_path)]
        adapted[key] = value
    return adapted


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_state_dict_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                          allowed_missing: tuple[str, ...] = ()) -> None:
    """Raise one CheckpointMismatchError naming the model and the first offending keys."""
    own = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict and k not in allowed_missing
                   and not is_derived_buffer(model, k)]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"{len(missing)} model keys missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected checkpoint keys (not in the model): {_listing(unexpected)}")
    mismatched = [f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})"
                  for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit model '{model_name(model)}': " + "; ".join(problems)
            + ". Is it the checkpoint of another model or size?")


def _first_conv(model: nn.Module) -> str | None:
    traits = getattr(model, "_traits", None) or {}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = traits.get("first_conv", cfg.get("first_conv"))
    return name[0] if isinstance(name, (tuple, list)) else name


def adapt_for_finetune(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                         tuple[str, ...]]:
    """timm's fine-tuning adaptations: the stem conv adapted to the model's input channels (timm's
    `adapt_input_conv`: summed for 1 channel, repeated and rescaled otherwise), and the classifier dropped when the
    model has another number of classes than its pretrained_cfg (or none, num_classes=0), so the model keeps its
    freshly initialised head. Each adaptation is reported (logging, WARNING level). Returns the state_dict and the model keys that
    may now be missing from it."""
    from timm.models import adapt_input_conv

    own = model.state_dict()
    state_dict = dict(state_dict)
    allowed_missing: list[str] = []
    first_conv = _first_conv(model)
    key = f"{first_conv}.weight" if first_conv else None
    if key and key in state_dict and key in own and state_dict[key].dim() == 4:
        source, target = state_dict[key].shape[1], own[key].shape[1]
        if source != target and state_dict[key].shape[0] == own[key].shape[0]:
            state_dict[key] = adapt_input_conv(target, state_dict[key])
            _logger.warning("%s: adapted the pretrained stem conv '%s' from %d to %d input channels (timm's "
                            "adapt_input_conv)", model_name(model), first_conv, source, target)
    # timm's rule: the classifier is dropped when the model's class count differs from the pretrained_cfg's
    # (num_classes=0 included) and the stored one does not fit (a label map may have selected its rows); with the
    # same count, a classifier of another shape stays a mismatch error
    head = [k for k in ("head.weight", "head.bias") if k in state_dict]
    cfg_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
    classes = getattr(model, "num_classes", None)
    fits = all(k in own and tuple(own[k].shape) == tuple(state_dict[k].shape) for k in head)  # e.g. a label map
    if head and not fits and cfg_classes is not None and classes != cfg_classes:
        stored = tuple(state_dict["head.weight"].shape) if "head.weight" in state_dict else None
        for k in head:
            del state_dict[k]
        allowed_missing += ["head.weight", "head.bias"]
        if classes:
            _logger.warning("%s: the checkpoint's classifier (%s classes) does not fit num_classes=%s: the head "
                            "is re-initialised and must be trained", model_name(model),
                            stored[0] if stored else "?", classes)
        else:
            _logger.warning("%s: num_classes=0, the checkpoint's classifier is dropped (the model returns "
                            "pre-logits features)", model_name(model))
    return state_dict, tuple(allowed_missing)


def _weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping, trusted: bool, sha256: str | None,
             use_ema: bool, allow_non_finite: bool) -> dict[str, torch.Tensor]:
    """The state_dict to load from a path/URL/dict, by the rules of this module's docstring."""
    source = None
    if not isinstance(checkpoint, Mapping):
        source = checkpoint
        checkpoint = read_checkpoint(checkpoint, trusted=trusted, sha256=sha256)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema)
    if not allow_non_finite:
        check_finite(state_dict, model, source)
    return state_dict


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping, strict: bool = True,
                    label_map_path: str | None = None, use_ema: bool = False, trusted: bool = False,
                    sha256: str | None = None, finetune: bool = False, allow_non_finite: bool = False):
    """Load the study's (or our) classification checkpoint into a unified classification model.

    `checkpoint`: path, https URL, bare state_dict or a `{'model': ...}`/`{'model_ema': ...}` dict; which
    weights, prefixes, hashes and non-finite values follow the rules of this module's docstring.
    `finetune=True` (what `timm.create_model(..., pretrained=True)` uses): a classifier of another size, or
    none, is re-initialised and the stem adapted to `in_chans` instead of being errors (`adapt_for_finetune`).
    Returns torch's `_IncompatibleKeys` (always empty lists in strict mode, which raises instead).
    """
    model = getattr(model, "model", model) if not hasattr(model, "block_type") else model  # unwrap features
    state_dict = _weights(model, checkpoint, trusted, sha256, use_ema, allow_non_finite)
    adapted = adapt_state_dict(model, state_dict, label_map_path=label_map_path)
    allowed_missing: tuple[str, ...] = ()
    if finetune:
        adapted, allowed_missing = adapt_for_finetune(model, adapted)
    check_state_dict_keys(model, adapted, strict=strict, allowed_missing=allowed_missing)
    return nn.Module.load_state_dict(model, adapted, strict=False)


def load_into_dense_backbone(model: nn.Module, checkpoint: str | os.PathLike | Mapping, trusted: bool = False,
                             use_ema: bool = False, sha256: str | None = None, allow_non_finite: bool = False):
    """Load a classification checkpoint into a dense (detection) backbone (spec §5).

    Drops `conv_head*`/`head*` and stage norms (the detection trunk has none), keeps the fresh
    `out_norm_*`; no interpolation: tables must already have the model's shapes. Which weights, prefixes,
    hashes and non-finite values follow the rules of this module's docstring.
    """
    state_dict = _weights(model, checkpoint, trusted, sha256, use_ema, allow_non_finite)
    own = model.state_dict()
    kept = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(("conv_head", "head")) or is_derived_buffer(model, key):
            continue
        if key not in own:
            if "stage_norms" not in key:
                unexpected.append(key)
            continue
        kept[key] = value
    missing = [k for k in own if k not in kept and "out_norm_" not in k and not is_derived_buffer(model, k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} backbone keys missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise CheckpointMismatchError(f"checkpoint does not fit backbone '{model_name(model)}': " + "; ".join(parts))
    check_state_dict_keys(model, kept, strict=False)
    return nn.Module.load_state_dict(model, kept, strict=False)
