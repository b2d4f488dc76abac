"""The embedded default dataset: scikit-learn's 8x8 handwritten digits written in the ImageNet layout.

With no --data_path the app trains on these 1,797 images (10 classes), so that the main job runs
anywhere without a download. They are written once as RGB PNGs into
``${STM_CACHE:-~/.cache/stm}/digits_imagenet/`` with ``meta/train.txt`` and ``meta/val.txt`` (a fixed,
stratified, seeded 80/20 split) and are then read by exactly the same code as ImageNet.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from stm_backbones.cache import ensure_versioned_dir

DIGITS_DIRNAME = "digits_imagenet"
DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SIZE = 32
SPLIT_SEED = 0
VAL_FRACTION = 0.2
# Bump when the written content changes, so stale caches are rebuilt instead of silently reused.
FORMAT_VERSION = "1"


def _split_indices(labels: np.ndarray) -> tuple[list[int], list[int]]:
    """Stratified split: per class, a seeded shuffle then the first 20% go to val."""
    rng = np.random.RandomState(SPLIT_SEED)
    train, val = [], []
    for c in range(DIGITS_NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * VAL_FRACTION))
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def _write(root: str) -> None:
    from sklearn.datasets import load_digits  # ships its data inside the package: no download

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # values are 0..16
    labels = digits.target.astype(int)
    os.makedirs(os.path.join(root, "meta"))
    for split, indices in zip(("train", "val"), _split_indices(labels)):
        lines = []
        for i in indices:
            rel = f"{labels[i]}/digit_{i:04d}.png"
            path = os.path.join(root, split, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            img = Image.fromarray(images[i]).resize((DIGITS_IMAGE_SIZE,) * 2, Image.BILINEAR)
            img.convert("RGB").save(path)
            lines.append(f"{rel} {labels[i]}")
        with open(os.path.join(root, "meta", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def ensure_digits_dataset() -> str:
    """Return the dataset root, writing it first if needed (atomic and safe for concurrent writers:
    `stm_backbones.cache.ensure_versioned_dir`)."""
    root, written = ensure_versioned_dir(DIGITS_DIRNAME, FORMAT_VERSION, _write)
    if written:
        print(f"Wrote the digits dataset to {root}")
    return root
