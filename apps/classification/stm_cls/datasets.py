"""Datasets, transforms and samplers.

Two on-disk layouts are accepted under ``--data_path`` (detected automatically):

* list layout (ImageNet as used by the reference): ``meta/train.txt`` and ``meta/val.txt`` with
  lines ``<relative path> <integer label>``; images under ``train/`` and ``val/``.
* class-folder layout: ``train/<class>/<image>`` and ``val/<class>/<image>``; classes are the sorted
  folder names of ``train/`` (the ImageFolder convention), labels are their indices.

Every configuration problem that can be seen without decoding images raises ``DatasetError`` before
training starts. Undecodable images are skipped at load time (see ``ImageListDataset``).
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import sys

import torch
from PIL import Image, ImageOps
from timm.data import auto_augment as timm_auto_augment
from timm.data import create_transform
from timm.data.constants import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_CONSECUTIVE_FAILURES = 50


class DatasetError(RuntimeError):
    """A problem with the dataset on disk (missing folder/list file, bad line, bad label)."""


class UnreadableDataError(RuntimeError):
    """Too many images failed to decode during the run."""


# --------------------------------------------------------------------------------------------------
# Index building
# --------------------------------------------------------------------------------------------------

def parse_list_file(list_path: str, nb_classes: int) -> list[tuple[str, int]]:
    """Read ``<relative_path> <label>`` lines; sample i is (non-blank) line i.

    A line must split on a single space into exactly two fields (so paths cannot contain spaces), and
    the label must be an integer in [0, nb_classes). Blank lines are ignored.
    """
    if not os.path.isfile(list_path):
        raise DatasetError(f"list file not found: {list_path}")
    with open(list_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    samples = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split(" ")
        if len(fields) != 2 or not fields[0]:
            raise DatasetError(f"{list_path}:{lineno}: malformed line {line!r} "
                               f"(expected '<relative_path> <label>' separated by one space)")
        try:
            label = int(fields[1])
        except ValueError:
            raise DatasetError(f"{list_path}:{lineno}: label {fields[1]!r} is not an integer") from None
        if not 0 <= label < nb_classes:
            raise DatasetError(f"{list_path}:{lineno}: label {label} is outside [0, {nb_classes}) "
                               f"(set --nb_classes to the number of classes)")
        samples.append((fields[0], label))
    if not samples:
        raise DatasetError(f"list file is empty: {list_path}")
    return samples


def scan_class_folders(split_dir: str, class_to_idx: dict[str, int] | None = None):
    """Index ``split_dir/<class>/<image>``; returns (classes, samples with paths relative to split_dir)."""
    if not os.path.isdir(split_dir):
        raise DatasetError(f"image folder not found: {split_dir}")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not found:
        raise DatasetError(f"no class sub-folders in {split_dir}")
    if class_to_idx is None:
        class_to_idx = {name: i for i, name in enumerate(found)}
    unknown = [c for c in found if c not in class_to_idx]
    if unknown:
        raise DatasetError(f"{split_dir}: class folder(s) {unknown[:5]} do not exist in the training set")
    samples = []
    empty = []
    for name in found:
        cls_dir = os.path.join(split_dir, name)
        before = len(samples)
        for dirpath, _, files in sorted(os.walk(cls_dir, followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    rel = os.path.relpath(os.path.join(dirpath, fname), split_dir)
                    samples.append((rel, class_to_idx[name]))
        if len(samples) == before:
            empty.append(name)
    if not samples:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir}")
    if empty:
        # A class folder without images would silently become a class that can never be learned (train) or
        # a folder whose images were forgotten (val).
        shown = ", ".join(os.path.join(split_dir, n) for n in empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise DatasetError(f"{len(empty)} class folder(s) hold no images ({', '.join(IMAGE_EXTENSIONS)}): {shown}; "
                           f"add images or remove the folder(s)")
    classes = sorted(class_to_idx, key=class_to_idx.get)
    return classes, samples


def detect_layout(root: str) -> str:
    """'list' when ``meta/`` exists, 'folder' when ``train/`` holds class folders; else DatasetError."""
    if not os.path.isdir(root):
        raise DatasetError(f"--data_path directory not found: {root}")
    if os.path.isdir(os.path.join(root, "meta")):
        return "list"
    if os.path.isdir(os.path.join(root, "train")):
        return "folder"
    raise DatasetError(f"{root}: expected either meta/train.txt + meta/val.txt with train/ and val/ "
                       f"(ImageNet list layout) or train/<class>/* and val/<class>/* (class folders)")


def build_index(root: str, nb_classes: int):
    """Return (layout, train_samples, val_samples, nb_classes, class_names or None)."""
    layout = detect_layout(root)
    if layout == "list":
        train = parse_list_file(os.path.join(root, "meta", "train.txt"), nb_classes)
        val = parse_list_file(os.path.join(root, "meta", "val.txt"), nb_classes)
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise DatasetError(f"image folder not found: {os.path.join(root, split)}")
        return layout, train, val, nb_classes, None
    classes, train = scan_class_folders(os.path.join(root, "train"))
    _, val = scan_class_folders(os.path.join(root, "val"), {c: i for i, c in enumerate(classes)})
    return layout, train, val, len(classes), classes


# --------------------------------------------------------------------------------------------------
# Dataset with corrupt-image skipping
# --------------------------------------------------------------------------------------------------

class FailureTracker:
    """Counts distinct unreadable files in shared memory, so DataLoader workers see one total.

    ``limit`` < 0 disables the total limit. The count is per process (rank), not global.
    """

    def __init__(self, num_samples: int, limit: int):
        self.limit = limit
        self.count = multiprocessing.Value("l", 0)
        self.seen = multiprocessing.Array("b", max(num_samples, 1), lock=False)

    def record(self, index: int) -> tuple[bool, int]:
        """Mark a failure; returns (first time this file failed, total distinct failures)."""
        with self.count.get_lock():
            first = not self.seen[index]
            if first:
                self.seen[index] = 1
                self.count.value += 1
            return first, self.count.value


def decode_rgb(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")  # convert() forces the full decode, so truncated files fail here


class ImageListDataset(Dataset):
    """(image, label) pairs from a list of (path relative to ``image_dir``, label).

    Training (``skip_unreadable=False``): a file that cannot be read or decoded is reported on stderr
    (once per file) and replaced by the next index, as the reference does. Evaluation
    (``skip_unreadable=True``): it is reported and yields ``SKIPPED`` instead, which
    :func:`collate_skipping` drops, so each readable image is counted exactly once and the unreadable
    ones are not counted (a replacement would count its neighbour twice). Either way more than 50
    consecutive failures, or more than ``max_failed`` distinct failures, raise an error that stops the run.
    """

    def __init__(self, image_dir: str, samples, transform=None, max_failed: int = 100, in_memory: bool = False,
                 skip_unreadable: bool = False):
        self.image_dir = image_dir
        self.samples = list(samples)
        self.transform = transform
        self.skip_unreadable = skip_unreadable
        self.failures = FailureTracker(len(self.samples), max_failed)
        self.cache = None
        if in_memory:  # --data_on_memory: hold the encoded bytes in RAM (meant for small datasets)
            self.cache = [self._read_file(i) for i in range(len(self.samples))]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.samples[index][0])

    def _read_file(self, index: int) -> bytes | None:
        try:
            with open(self.path(index), "rb") as f:
                return f.read()
        except OSError:
            return None  # reported when the sample is decoded

    def load(self, index: int) -> Image.Image:
        data = self.cache[index] if self.cache is not None else self._read_file(index)
        if data is None:
            raise OSError(f"cannot read {self.path(index)}")
        return decode_rgb(data)

    def __getitem__(self, index: int):
        for attempt in range(MAX_CONSECUTIVE_FAILURES + 1):
            i = (index + attempt) % len(self.samples)
            try:
                img = self.load(i)
                break
            except Exception as exc:  # any decoder error means "unreadable image"
                first, total = self.failures.record(i)
                if first:
                    instead = "it is not counted" if self.skip_unreadable else "using the next sample instead"
                    print(f"WARNING: skipping unreadable image {self.path(i)} ({type(exc).__name__}: {exc}); "
                          f"{instead}", file=sys.stderr, flush=True)
                if 0 <= self.failures.limit < total:
                    raise UnreadableDataError(f"{total} unreadable images so far (last: {self.path(i)}), more than "
                                       f"--max_failed_images={self.failures.limit}; check the dataset") from exc
                if self.skip_unreadable:
                    return SKIPPED
        else:
            raise UnreadableDataError(f"more than {MAX_CONSECUTIVE_FAILURES} consecutive unreadable images starting at "
                               f"{self.path(index)}; check the dataset")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[i][1]


SKIPPED = None  # what an evaluation dataset yields for an unreadable image


def collate_skipping(batch):
    """default_collate over the readable samples; returns (images, targets, number skipped).

    A batch in which every image was unreadable gives empty tensors (the evaluation loop skips them).
    """
    kept = [b for b in batch if b is not SKIPPED]
    skipped = len(batch) - len(kept)
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = torch.utils.data.default_collate(kept)
    return images, targets, skipped


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------

def _posterize_allowing_zero_bits(img, bits_to_keep, **__):
    """timm's posterize, but 0 bits gives the black image that older Pillow produced.

    RandAugment's 'PosterizeIncreasing' reaches 0 bits at magnitude 10 (m9 plus noise); Pillow >= 12
    rejects bits < 1 with a ValueError, which would crash a data-loader worker mid-epoch.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size, 0)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_timm_posterize() -> None:
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in timm_auto_augment.NAME_TO_OP:
            timm_auto_augment.NAME_TO_OP[name] = _posterize_allowing_zero_bits


def normalization(args):
    """(mean, std): --imagenet_default_mean_and_std true/false, unset: the model's pretrained_cfg (the
    weights a pretrained model expects; ImageNet's for the study's models). Old checkpoints' args hold
    True here, which keeps their meaning."""
    choice = getattr(args, "imagenet_default_mean_and_std", None)
    if choice is None:
        from .models import pretrained_cfg_of

        cfg = pretrained_cfg_of(getattr(args, "model", ""))
        if cfg.get("mean") and cfg.get("std"):
            return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
        choice = True
    if choice:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def eval_transform_config(args, input_size: int | None = None) -> dict:
    """The evaluation transform as plain values: what the user set, else the model's pretrained_cfg.

    {'input_size', 'crop_pct', 'crop_mode' ('center': resize the short side to input_size / crop_pct,
    then centre-crop; 'squash': resize to input_size x input_size), 'interpolation', 'mean', 'std'}.
    With --crop_pct unset, inputs of 384 px and more are squashed (the study's rule), smaller ones use the
    pretrained_cfg's crop_pct. Training records this in args.eval_transform (so in every checkpoint), and
    predict.py rebuilds the same transform from it; ``input_size`` overrides the size.
    """
    from .models import pretrained_cfg_of

    cfg = pretrained_cfg_of(getattr(args, "model", ""))
    size = int(input_size or args.input_size)
    crop_pct = getattr(args, "crop_pct", None)
    crop_mode = "center"
    if crop_pct is None:
        if size >= 384:
            crop_pct, crop_mode = 1.0, "squash"
        else:
            crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = getattr(args, "eval_interpolation", None) or cfg.get("interpolation") or "bicubic"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"  # timm's 'random' (a training choice) has no meaning at evaluation
    mean, std = normalization(args)
    return dict(input_size=size, crop_pct=float(crop_pct), crop_mode=crop_mode, interpolation=interpolation,
                mean=[float(v) for v in mean], std=[float(v) for v in std])


def transform_from_config(config: dict):
    """torchvision transform of an ``eval_transform_config`` dict (PIL RGB image -> normalised tensor)."""
    size, mode = int(config["input_size"]), T.InterpolationMode(config["interpolation"])
    if config.get("crop_mode") == "squash":
        steps = [T.Resize((size, size), interpolation=mode)]
    else:
        steps = [T.Resize(int(size / config["crop_pct"]), interpolation=mode), T.CenterCrop(size)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(config["mean"], config["std"])])


def build_transform(is_train: bool, args):
    mean, std = normalization(args)
    if is_train:
        aa = args.aa if args.aa and args.aa.lower() != "none" else None
        if aa:
            _patch_timm_posterize()  # before create_transform: AugmentOp looks the op up at construction
        return create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter, auto_augment=aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std,
            scale=getattr(args, "train_crop_scale", None), hflip=getattr(args, "train_hflip", 0.5),
        )
    args.eval_transform = eval_transform_config(args)  # recorded in checkpoints, for predict.py
    return transform_from_config(args.eval_transform)


def build_datasets(args):
    """Index the data under args.data_path, set args.nb_classes, and return (train_set, val_set)."""
    layout, train, val, nb_classes, classes = build_index(args.data_path, args.nb_classes)
    if layout == "folder" and nb_classes != args.nb_classes:
        print(f"Class-folder layout: --nb_classes set to {nb_classes} (number of class folders)")
    args.nb_classes = nb_classes
    args.data_layout = layout
    if classes is not None:  # class-folder names travel in the checkpoint's args (predict.py labels with them)
        args.class_names = list(classes)
    common = dict(max_failed=args.max_failed_images, in_memory=args.data_on_memory)
    train_set = ImageListDataset(os.path.join(args.data_path, "train"), train, build_transform(True, args), **common)
    val_set = ImageListDataset(os.path.join(args.data_path, "val"), val, build_transform(False, args),
                               skip_unreadable=True, **common)
    print(f"Dataset {args.data_path} ({layout} layout): {len(train_set)} train / {len(val_set)} val images, "
          f"{nb_classes} classes")
    return train_set, val_set


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------

class ShardedEvalSampler(Sampler):
    """Rank r gets indices r, r+W, r+2W, ... with no padding, so every sample is counted exactly once
    when per-rank sums are all-reduced (DistributedSampler pads with duplicates)."""

    def __init__(self, dataset, num_replicas: int, rank: int):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class RepeatedAugSampler(Sampler):
    """Repeated augmentation: each index appears ``repeats`` times per epoch, interleaved over ranks so
    the copies land on different ranks; each rank then takes ``floor(len // 256 * 256 / world)`` samples
    (falling back to ``ceil(len / world)`` for datasets smaller than 256 images)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0, repeats: int = 3):
        self.n, self.world, self.rank = len(dataset), num_replicas, rank
        self.shuffle, self.seed, self.repeats, self.epoch = shuffle, seed, repeats, 0
        self.num_samples = int(math.ceil(self.n * repeats / num_replicas))
        selected = int(math.floor(self.n // 256 * 256 / num_replicas))
        self.num_selected = selected if selected > 0 else int(math.ceil(self.n / num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        order = [i for i in order for _ in range(self.repeats)]
        total = self.num_samples * self.world
        order += order[: total - len(order)]
        return iter(order[self.rank:total:self.world][: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected
