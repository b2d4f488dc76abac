"""Helpers shared by the classification tests (imported as a plain module: pytest runs in importlib mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

APP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = APP_DIR.parents[1]
MAIN_PY = APP_DIR / "main.py"

MODEL = "unified_convnext_micro"
SECOND_MODEL = "unified_pvt_micro"
NUM_CLASSES = 4
# Fast settings shared by most runs: micro model, 32 px, no workers (deterministic), fp32.
FAST_ARGS = ["--model", MODEL, "--input_size", "32", "--batch_size", "8", "--num_workers", "0",
             "--warmup_epochs", "1", "--lr", "2e-3", "--model_ema_decay", "0.9", "--use_amp", "false",
             "--nb_classes", str(NUM_CLASSES)]
NO_AUG_ARGS = ["--aa", "none", "--mixup", "0", "--cutmix", "0", "--reprob", "0"]

def _class_image(label: int, index: int, size: int = 32) -> Image.Image:
    """A learnable toy image: class-specific colour and bar orientation plus noise."""
    rng = np.random.RandomState(1000 * label + index)
    colours = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (230, 210, 30)]
    arr = rng.randint(0, 60, size=(size, size, 3)).astype(np.uint8)
    c = colours[label % len(colours)]
    if label % 2 == 0:
        arr[:, size // 3: 2 * size // 3] = c
    else:
        arr[size // 3: 2 * size // 3, :] = c
    return Image.fromarray(arr)


def write_list_dataset(root: Path, n_train_per_class: int = 8, n_val: int = 15, num_classes: int = NUM_CLASSES) -> Path:
    """ImageNet list layout: train in class sub-folders, val flat (like ILSVRC val), JPEG + PNG."""
    (root / "meta").mkdir(parents=True)
    lines = []
    for c in range(num_classes):
        (root / "train" / f"n{c:08d}").mkdir(parents=True)
        for i in range(n_train_per_class):
            rel = f"n{c:08d}/img_{c}_{i}.JPEG"
            _class_image(c, i).save(root / "train" / rel, format="JPEG", quality=95)
            lines.append(f"{rel} {c}")
    (root / "meta" / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "val").mkdir()
    lines = []
    for i in range(n_val):
        c = i % num_classes
        rel = f"val_{i:04d}.png"
        _class_image(c, 100 + i).save(root / "val" / rel)
        lines.append(f"{rel} {c}")
    (root / "meta" / "val.txt").write_text("\n".join(lines) + "\n")
    return root


def write_folder_dataset(root: Path, n_per_class: int = 6, num_classes: int = 3) -> Path:
    for split, offset in (("train", 0), ("val", 100)):
        for c in range(num_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True)
            for i in range(n_per_class if split == "train" else 2):
                _class_image(c, offset + i).save(d / f"{i}.png")
    return root


def read_log(output_dir) -> list[dict]:
    with open(Path(output_dir) / "log.txt") as f:
        return [json.loads(line) for line in f if line.strip()]


def subprocess_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(args, timeout: int = 180, threads: int = 1, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN_PY), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(threads), cwd=str(REPO_ROOT), **kwargs)
