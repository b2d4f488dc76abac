"""Loading the study's checkpoints into our models.

`load_checkpoint` accepts a path, an https URL, a bare state_dict or a training-script dict
(`{'model': ..., 'model_ema': ..., 'optimizer': ..., 'args': Namespace, ...}`), applies the study's
loading rules (`adapt_state_dict`) and fails with one readable message when the checkpoint belongs
to another model (`CheckpointMismatchError`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cache import cache_root

IGNORED_BUFFER_TAGS = ("relative_position_index", "attn_mask")
_MAX_LISTED = 5


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not fit the model."""


def model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _is_ignored_buffer(key: str) -> bool:
    return any(tag in key for tag in IGNORED_BUFFER_TAGS)


# ---------------------------------------------------------------------------------- reading files
def _download(url: str) -> Path:
    cache = Path(cache_root()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / Path(urllib.parse.urlparse(url).path).name
    if not target.exists():
        torch.hub.download_url_to_file(url, str(target), progress=True)  # writes a temp file, then renames
    return target


def read_checkpoint(source: str | os.PathLike, trusted: bool = False) -> Any:
    """torch.load a local file or URL. Training-script dicts (with an argparse Namespace) load in
    weights-only mode; other pickled objects need `trusted=True`."""
    text = str(source)
    path = _download(text) if text.startswith(("http://", "https://")) else Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # `safe_globals` removes what it added on exit, so only enter it when Namespace is not already
    # allowed process-wide (an app's add_safe_globals must survive our loads).
    namespace_allowed = argparse.Namespace in torch.serialization.get_safe_globals()
    allow_namespace = (contextlib.nullcontext() if namespace_allowed
                       else torch.serialization.safe_globals([argparse.Namespace]))
    try:
        with allow_namespace:
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        hint = "" if trusted else " (if you trust the file, pass trusted=True to unpickle arbitrary objects)"
        raise RuntimeError(f"could not read checkpoint {path}: {error}{hint}") from error


def extract_state_dict(checkpoint: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: `model` (or `model_ema` with use_ema), `state_dict`, `module`, or bare."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"a checkpoint must be a dict, got {type(checkpoint).__name__}")
    order = ("model_ema", "model") if use_ema else ("model", "model_ema")
    for key in (*order, "state_dict", "module"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {}
    for key, value in checkpoint.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint entry '{key}' is a {type(value).__name__}, not a tensor: "
                            "is this a state_dict?")
        state_dict[key[len("module."):] if key.startswith("module.") else key] = value
    return state_dict


# ---------------------------------------------------------------------------------- study rules
def _resize_relative_position_table(table: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
    (len_src, heads_src), (len_dst, heads_dst) = table.shape, target.shape
    if heads_src != heads_dst:
        raise CheckpointMismatchError(f"'{key}': checkpoint has {heads_src} heads, the model {heads_dst}")
    side_src, side_dst = int(math.sqrt(len_src)), int(math.sqrt(len_dst))
    grid = table.float().t().reshape(1, heads_src, side_src, side_src)
    grid = F.interpolate(grid, size=(side_dst, side_dst), mode="bicubic", align_corners=False)
    return grid.reshape(heads_dst, len_dst).t().to(table.dtype)


def _resize_halo_embedding(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if table.shape == target.shape:
        return table
    line = table.float().t().unsqueeze(0)  # (1, d, R1)
    line = F.interpolate(line, size=target.shape[0], mode="linear", align_corners=True)
    return line[0].t().to(table.dtype)


def _resize_pos_embed(embed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if embed.shape == target.shape:
        return embed
    resized = F.interpolate(embed.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
    return resized.to(embed.dtype)


def _read_label_map(path: str | os.PathLike) -> torch.Tensor:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return torch.tensor([int(line) for line in lines], dtype=torch.long)


def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     label_map_path: str | None = None) -> dict[str, torch.Tensor]:
    """Apply the study's loading rules (spec §1.7) to a state_dict for `model`."""
    own = model.state_dict()
    label_map_path = label_map_path or getattr(model, "label_map_path", None)
    resize_pos_embed = getattr(getattr(model, "block_type", None), "RESIZE_POS_EMBED_ON_LOAD", False)
    adapted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if _is_ignored_buffer(key):
            continue  # the model keeps the index/mask buffers it computed itself
        target = own.get(key)
        if target is not None:
            if "relative_position_bias_table" in key:
                value = _resize_relative_position_table(value, target, key)
            elif "height_rel" in key or "width_rel" in key:
                value = _resize_halo_embedding(value, target)
            elif "head" in key and "conv" not in key and value.shape[0] != target.shape[0]:
                if label_map_path:
                    value = value[_read_label_map(label_map_path)]
            elif resize_pos_embed and "pos_embed" in key:
                value = _resize_pos_embed(value, target)
        adapted[key] = value
    return adapted


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def check_state_dict_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True,
                          allowed_missing: tuple[str, ...] = IGNORED_BUFFER_TAGS) -> None:
    """Raise one CheckpointMismatchError naming the model and the first offending keys."""
    own = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict and not any(t in k for t in allowed_missing)]
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


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping, strict: bool = True,
                    label_map_path: str | None = None, use_ema: bool = False, trusted: bool = False):
    """Load the study's (or our) classification checkpoint into a unified classification model.

    `checkpoint`: path, https URL, bare state_dict or a `{'model': ...}`/`{'model_ema': ...}` dict.
    Returns torch's `_IncompatibleKeys` (always empty lists in strict mode, which raises instead).
    """
    model = getattr(model, "model", model) if not hasattr(model, "block_type") else model  # unwrap features
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema)
    adapted = adapt_state_dict(model, state_dict, label_map_path=label_map_path)
    check_state_dict_keys(model, adapted, strict=strict)
    return nn.Module.load_state_dict(model, adapted, strict=False)


def load_into_dense_backbone(model: nn.Module, checkpoint: str | os.PathLike | Mapping, trusted: bool = False):
    """Load a classification checkpoint into a dense (detection) backbone (spec §5).

    Drops `conv_head*`/`head*` and stage norms (the detection trunk has none), keeps the fresh
    `out_norm_*`; no interpolation: tables must already have the model's shapes.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    state_dict = extract_state_dict(checkpoint)
    own = model.state_dict()
    kept = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.startswith(("conv_head", "head")) or _is_ignored_buffer(key):
            continue
        if key not in own:
            if "stage_norms" not in key:
                unexpected.append(key)
            continue
        kept[key] = value
    missing = [k for k in own if k not in kept and "out_norm_" not in k and not _is_ignored_buffer(k)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} backbone keys missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        raise CheckpointMismatchError(f"checkpoint does not fit backbone '{model_name(model)}': " + "; ".join(parts))
    check_state_dict_keys(model, kept, strict=False)
    return nn.Module.load_state_dict(model, kept, strict=False)
