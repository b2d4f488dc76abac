"""Classify one's own images with a trained checkpoint (the engine of ``apps/classification/predict.py``).

Everything a prediction needs is taken from the checkpoint when it records it, so that a model trained
by ``main.py`` predicts new images exactly as it was evaluated during training:

* the architecture arguments (``args.model``, ``nb_classes``, ``input_size``, ``model_kwargs``, ...);
* the evaluation transform (``args.eval_transform``: size, crop, interpolation, mean/std), or for older
  checkpoints the same values rebuilt from their args, or for released weights-only files the model's
  ``pretrained_cfg``;
* the class names (``class_names`` in the checkpoint or its args: the digits' "0".."9", a class-folder
  dataset's folder names), else ImageNet-1k's names for 1000 classes, else ``class_<i>``.

Files are only ever read weights-only (``stm_cls.checkpoint.load_file``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import checkpoint as ckpt_io
from .datasets import IMAGE_EXTENSIONS, eval_transform_config, transform_from_config
from .models import ModelConfigError, UnknownModelError, check_model_name, create_model, import_backbones

GRID_NAME = "predictions.png"
JSON_NAME = "predictions.json"
GLOB_CHARS = set("*?[")


class PredictError(ValueError):
    """A bad argument or unusable checkpoint: reported as ``ERROR: ...`` with exit code 2."""


@dataclass
class Inputs:
    images: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # arguments that named nothing readable


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def _images_in(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, files in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def expand_inputs(items) -> Inputs:
    """Files (any extension: a non-image is reported when it fails to decode), folders (searched
    recursively for image extensions) and glob patterns (``**`` allowed), in the order given, each path
    once."""
    out, seen = Inputs(), set()
    for item in items:
        if os.path.isdir(item):
            paths = _images_in(item)
        elif os.path.isfile(item):
            paths = [item]
        elif GLOB_CHARS & set(item):
            paths = []
            for p in sorted(glob.glob(item, recursive=True)):
                paths += _images_in(p) if os.path.isdir(p) else [p]
        else:
            paths = []
        if not paths:
            out.missing.append(item)
        for p in paths:
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                out.images.append(p)
    return out


def read_class_names_file(path: str) -> list[str]:
    """One class name per line (surrounding whitespace stripped; blank lines at the end ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except OSError as exc:
        raise PredictError(f"--class_names: cannot read {path} ({exc.strerror or exc})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines or any(not line for line in lines):
        raise PredictError(f"--class_names: {path} must hold one non-empty class name per line")
    return lines


# --------------------------------------------------------------------------------------------------
# Checkpoint -> model, transform, class names
# --------------------------------------------------------------------------------------------------

def _ckpt_args(ckpt) -> argparse.Namespace | None:
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if isinstance(args, argparse.Namespace):
        return args
    if isinstance(args, dict):
        return argparse.Namespace(**args)
    return None


def _state_dict(ckpt, use_ema: bool) -> dict:
    if not isinstance(ckpt, dict):
        raise PredictError(f"checkpoint holds a {type(ckpt).__name__}, expected a dict of weights")
    keys = ("model_ema", "model") if use_ema else ("model", "model_ema")
    for key in (*keys, "state_dict", "module"):
        if isinstance(ckpt.get(key), dict):
            if use_ema and key != "model_ema":
                raise PredictError("--ema: the checkpoint has no 'model_ema' entry")
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise PredictError("the checkpoint has no weights ('model', 'model_ema', 'state_dict' or a bare state_dict)")


def _num_classes(state: dict, model_name: str) -> int:
    """Class count of a bare state_dict: rows of the classifier named in the pretrained_cfg."""
    from .models import pretrained_cfg_of

    classifier = pretrained_cfg_of(model_name).get("classifier") or "head"
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        weight = state.get(f"{name}.weight")
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            return int(weight.shape[0])
    raise PredictError(f"cannot tell the number of classes: no '{names[0]}.weight' in the checkpoint")


def model_args(cli, ckpt, state) -> argparse.Namespace:
    """The arguments create_model needs: the checkpoint's training args (same architecture, same
    model_kwargs), with --model/--input_size from the command line taking precedence."""
    saved = _ckpt_args(ckpt)
    name = cli.model or (saved.model if saved is not None else None)
    if not name:
        raise PredictError("--model is required: the checkpoint does not record its model name")
    if saved is not None and saved.model != name:
        print(f"WARNING: the checkpoint was trained as '{saved.model}', building '{name}'", file=sys.stderr)
    args = argparse.Namespace(
        model=name, nb_classes=None, input_size=None, layer_scale_init_value=1e-6, drop_path=None, model_kwargs={},
        head_init_scale=1.0, grad_checkpointing=False, pretrained=False, pretrained_path="",
        crop_pct=None, eval_interpolation=None, imagenet_default_mean_and_std=None)
    if saved is not None:
        for key in ("nb_classes", "input_size", "layer_scale_init_value", "model_kwargs", "crop_pct",
                    "eval_interpolation", "imagenet_default_mean_and_std", "eval_transform"):
            if hasattr(saved, key):
                setattr(args, key, getattr(saved, key))
        args.model = name
    if args.nb_classes is None:
        args.nb_classes = _num_classes(state, name)
    if cli.input_size:
        args.input_size = cli.input_size
    if not args.input_size:
        from .models import pretrained_cfg_of

        args.input_size = int((pretrained_cfg_of(name).get("input_size") or (3, 224, 224))[-1])
    return args


def transform_config(args, cli) -> dict:
    """The recorded eval transform (size overridden by --input_size), else one rebuilt from the args."""
    recorded = getattr(args, "eval_transform", None)
    if isinstance(recorded, dict) and {"input_size", "crop_pct", "interpolation", "mean", "std"} <= set(recorded):
        config = dict(recorded)
        if cli.input_size:
            config["input_size"] = cli.input_size
        return config
    return eval_transform_config(args)


def imagenet_names() -> list[str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def class_names(cli, ckpt, args) -> tuple[list[str], str]:
    """(names, where they came from)."""
    n = args.nb_classes
    if cli.class_names:
        names = read_class_names_file(cli.class_names)
        if len(names) != n:
            raise PredictError(f"--class_names: {cli.class_names} has {len(names)} names, the model {n} classes")
        return names, cli.class_names
    saved = _ckpt_args(ckpt)
    for names in ((ckpt.get("class_names") if isinstance(ckpt, dict) else None),
                  getattr(saved, "class_names", None)):
        if names is not None and len(names) == n:
            return [str(x) for x in names], "checkpoint"
    if saved is not None and getattr(saved, "data_layout", None) == "folder" and getattr(saved, "data_path", None):
        train_dir = os.path.join(saved.data_path, "train")
        if os.path.isdir(train_dir):  # the training set's class folders, if they are still there
            folders = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
            if len(folders) == n:
                return folders, f"class folders of {train_dir}"
    if n == 1000:
        return imagenet_names(), "ImageNet-1k"
    return [f"class_{i}" for i in range(n)], "class indices"


@dataclass
class Predictor:
    model: torch.nn.Module
    transform: object
    names: list[str]
    device: torch.device
    config: dict
    names_source: str
    model_name: str


def load_predictor(cli) -> Predictor:
    import_backbones()
    if cli.model:
        try:
            check_model_name(cli.model)
        except UnknownModelError as exc:
            raise PredictError(str(exc)) from None
    try:
        ckpt = ckpt_io.load_file(cli.checkpoint)
    except FileNotFoundError:
        raise PredictError(f"--checkpoint not found: {cli.checkpoint}") from None
    except (ckpt_io.CheckpointError, OSError, RuntimeError, ValueError) as exc:
        raise PredictError(f"cannot read checkpoint {cli.checkpoint}: {exc}") from None
    state = _state_dict(ckpt, cli.ema)
    args = model_args(cli, ckpt, state)
    try:
        model = create_model(args)
    except (UnknownModelError, ModelConfigError) as exc:
        raise PredictError(str(exc)) from None
    try:
        if type(model).__name__ == "MetaArch":
            from stm_backbones import load_checkpoint

            load_checkpoint(model, state, strict=True)  # the study's loader (interpolates tables to the size)
        else:
            model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise PredictError(f"{cli.checkpoint} does not fit '{args.model}' with {args.nb_classes} classes "
                           f"(wrong --model?): {str(exc).splitlines()[0]}") from None
    device = torch.device(cli.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    config = transform_config(args, cli)
    names, source = class_names(cli, ckpt, args)
    return Predictor(model, transform_from_config(config), names, device, config, source, args.model)


# --------------------------------------------------------------------------------------------------
# Prediction and outputs
# --------------------------------------------------------------------------------------------------

def _open_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # forces the full decode: a truncated file fails here


def predict(predictor: Predictor, paths: list[str], topk: int, batch_size: int, keep_thumbnails: int = 0):
    """Returns (results, skipped, thumbnails): results = [{"image", "topk": [{"class", "index", "prob"}]}]
    in input order; skipped = [(path, reason)]; thumbnails = {path: small PIL image} for the first
    ``keep_thumbnails`` readable images."""
    results, skipped, thumbs = [], [], {}
    k = min(topk, len(predictor.names))

    def flush(batch):
        x = torch.stack([t for _, t in batch]).to(predictor.device)
        with torch.inference_mode():
            probs = torch.softmax(predictor.model(x).float(), dim=-1).cpu()
        values, indices = probs.topk(k, dim=-1)
        for (path, _), v, i in zip(batch, values.tolist(), indices.tolist()):
            results.append({"image": path, "topk": [{"class": predictor.names[c], "index": int(c), "prob": float(p)}
                                                    for p, c in zip(v, i)]})

    batch = []
    for path in paths:
        try:
            img = _open_rgb(path)
        except Exception as exc:  # noqa: BLE001 - any decoder error means "unreadable image"
            reason = f"{type(exc).__name__}: {exc}"
            print(f"WARNING: skipping unreadable image {path} ({reason})", file=sys.stderr, flush=True)
            skipped.append((path, reason))
            continue
        if len(thumbs) < keep_thumbnails:
            thumb = img.copy()
            thumb.thumbnail((160, 160))
            thumbs[path] = thumb
        batch.append((path, predictor.transform(img)))
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return results, skipped, thumbs


def format_table(results: list[dict], topk: int) -> str:
    if not results:
        return "(no predictions)"
    k = min(topk, len(results[0]["topk"]))
    header = ["image"] + [f"top-{j + 1}" for j in range(k)]
    rows = [[r["image"]] + [f"{t['class']} ({100 * t['prob']:.1f}%)" for t in r["topk"]] for r in results]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _atomic_write(path: str, write) -> None:
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(results: list[dict], path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    _atomic_write(path, write)


def _short(text: str, limit: int = 22) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def write_grid(results: list[dict], thumbs: dict, path: str, columns: int = 6) -> int:
    """A PNG grid: each image with its top-3 labels and probabilities. Returns the number of images drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r["image"] in thumbs]
    if not shown:
        return 0
    cols = min(columns, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        ax.imshow(thumbs[r["image"]])
        lines = [f"{j + 1}. {_short(t['class'])}  {100 * t['prob']:.1f}%" for j, t in enumerate(r["topk"][:3])]
        ax.set_title("\n".join([_short(os.path.basename(r["image"]), 26)] + lines), fontsize=8, loc="left")
    fig.tight_layout(h_pad=1.5)

    def write(tmp):
        fig.savefig(tmp, dpi=100, format="png")
    try:
        _atomic_write(path, write)
    finally:
        plt.close(fig)
    return len(shown)
