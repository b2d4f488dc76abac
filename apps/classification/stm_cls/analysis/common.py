"""What every analysis shares: models with their checkpoints, the evaluation images, sharded
iteration with exact per-sample results, progress, mixed precision and atomic output files.

Exactness under ``torchrun``. Floating-point results of a network depend (in the last bits) on which
other images share its batch: oneDNN and cuDNN pick different blockings for different batch shapes.
So sharding must not change the batches. ``BlockBatchSampler`` cuts the evaluation list into the same
consecutive batches of ``--batch_size`` images that a single process uses and deals whole batches to the
ranks (batch k goes to rank k mod W; no padding, nothing duplicated). Every analysis records per-sample
(or per-batch) results keyed by position, ``gather_by_key`` all-gathers them, and the reductions run
in position order on the gathered values. A run with W processes therefore prints exactly the numbers
of a single-process run with the same batch size, threads and device.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import dist_utils
from ..datasets import DatasetError, ImageListDataset, build_index
from ..metrics import ProgressLogger
from ..models import UnknownModelError, create_model, import_backbones

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# Pixel distances of the protocols are given for 224 px inputs and scaled by S / 224 for other sizes.
REFERENCE_SIZE = 224


class AnalysisError(ValueError):
    """A user mistake (unknown model, unreadable checkpoint, bad argument): printed as ``ERROR: ...``."""


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

class Normalized(torch.nn.Module):
    """A classifier that takes images in [0, 1]: normalisation is part of the forward.

    The attacks perturb pixels, and the views are built in pixel space (black padding is 0 before
    normalisation), so every analysis feeds [0, 1] images to this wrapper.
    """

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


def check_model_names(names: Sequence[str]) -> None:
    import timm

    import_backbones()
    for name in names:
        if not timm.is_model(name):
            raise AnalysisError(str(UnknownModelError(
                f"unknown model '{name}' (see `python -m stm_backbones.summary --all` for the study's models; "
                f"any timm model name also works)")))


def load_model(name: str, nb_classes: int, img_size: int, resume: str | None, use_ema: bool = False) -> torch.nn.Module:
    """Build ``name`` as the training app does and load ``resume`` through the backbone package's
    loader (weights-only unpickling; tables and position embeddings interpolated to ``img_size``)."""
    ns = argparse.Namespace(model=name, nb_classes=nb_classes, input_size=img_size, layer_scale_init_value=1e-6)
    try:
        model = create_model(ns)
    except UnknownModelError as exc:
        raise AnalysisError(str(exc)) from None
    if resume:
        from stm_backbones import load_checkpoint

        try:
            load_checkpoint(model, resume, strict=True, use_ema=use_ema)
        except FileNotFoundError as exc:
            raise AnalysisError(f"--resume {resume}: {exc}") from None
        except (RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AnalysisError(f"--resume {resume} cannot be used for model '{name}': {first}") from None
    model.eval()
    try:  # some mixers only take certain sizes (e.g. Halo: multiples of 224); say so before the run
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except ValueError as exc:
        raise AnalysisError(f"model '{name}' cannot run at {img_size}x{img_size} px: {str(exc).splitlines()[0]}") from None
    return model


def pair_models(models: Sequence[str], resumes: Sequence[str] | None) -> list[tuple[str, str | None]]:
    """One checkpoint per model, in order (or none at all: random weights, for smoke runs)."""
    resumes = list(resumes or [])
    if resumes and len(resumes) != len(models):
        raise AnalysisError(f"{len(models)} --model but {len(resumes)} --resume: give one checkpoint per model, "
                            f"in the same order (or none)")
    return list(zip(models, resumes or [None] * len(models)))


def model_label(name: str, index: int, names: Sequence[str]) -> str:
    """The key of a model in the outputs: its name, or name#i when a name is given twice."""
    return name if list(names).count(name) == 1 else f"{name}#{index}"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def eval_images(data_path: str, nb_classes: int, max_failed: int = 100):
    """The validation images of ``data_path`` (either layout of the app) as an undecoded-PIL dataset."""
    try:
        _, _, val, nb_classes, _ = build_index(data_path, nb_classes)
    except DatasetError as exc:
        raise AnalysisError(str(exc)) from None
    return ImageListDataset(os.path.join(data_path, "val"), val, transform=None, max_failed=max_failed), nb_classes


def select_subset(n_total: int, num_images: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of ``num_images`` of them (kept in index order)."""
    if num_images is None or num_images >= n_total:
        return list(range(n_total))
    if num_images <= 0:
        raise AnalysisError(f"--num_images must be positive, got {num_images}")
    perm = np.random.RandomState(seed).permutation(n_total)[:num_images]
    return sorted(int(i) for i in perm)


class ViewDataset(Dataset):
    """Item ``pos`` = (make_views(PIL image, dataset index), label, pos) for the chosen subset."""

    def __init__(self, base: ImageListDataset, indices: Sequence[int], make_views: Callable):
        self.base, self.indices, self.make_views = base, list(indices), make_views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        index = self.indices[pos]
        img, label = self.base[index]
        return self.make_views(img, index), label, pos


class BlockBatchSampler(Sampler):
    """Consecutive batches of ``batch_size`` positions; batch k goes to rank k mod world.

    A single process (world 1) gets exactly the same batches in the same order, so every image is
    computed in an identical batch whatever the number of processes (see the module docstring).
    """

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0):
        starts = range(0, n, batch_size)
        self.batches = [list(range(s, min(s + batch_size, n))) for k, s in enumerate(starts) if k % world == rank]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    sampler = BlockBatchSampler(len(dataset), batch_size, dist_utils.get_world_size(), dist_utils.get_rank())
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


def gather_by_key(local: dict) -> dict:
    """Union of every rank's {key: value} (keys are positions or batch numbers; disjoint by design)."""
    merged = {}
    for part in dist_utils.all_gather_object(local):
        merged.update(part)
    return merged


def pixel_scale(size: int) -> float:
    return size / REFERENCE_SIZE


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def autocast(device: torch.device, enabled: bool):
    """float16 autocast on CUDA (the study's mixed precision); nothing elsewhere or when disabled."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.float16)


def progress(header: str, total: int, print_freq: int = 10) -> ProgressLogger:
    """The training app's progress lines (``[i/total] eta: ...``), rank 0 only."""
    return ProgressLogger(header, total, print_freq)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# --------------------------------------------------------------------------------------------------
# Output files (rank 0; atomic: temp file in the same folder, then os.replace)
# --------------------------------------------------------------------------------------------------

def _atomic_bytes(data: bytes, path: str) -> None:
    from ..checkpoint import atomic_write_bytes  # the app's one atomic writer (temp file, fsync, rename)

    atomic_write_bytes(data, path)


def _finite(obj):
    """JSON has no NaN/inf: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj, path: str) -> None:
    _atomic_bytes((json.dumps(_finite(obj), indent=1) + "\n").encode(), path)


def write_csv(rows: Iterable[dict], path: str) -> None:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _atomic_bytes(buf.getvalue().encode(), path)


def write_npz(arrays: dict, path: str) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    _atomic_bytes(buf.getvalue(), path)


def save_figure(fig, path: str, dpi: int = 90) -> None:
    """PNG with a 256-colour palette: a third of the size of matplotlib's RGBA file, same look."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    buf.seek(0)
    small = io.BytesIO()
    Image.open(buf).convert("RGB").quantize(colors=256).save(small, format="PNG", optimize=True)
    _atomic_bytes(small.getvalue(), path)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)
