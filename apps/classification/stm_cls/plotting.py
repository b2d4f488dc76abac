"""Loss/accuracy curves from log.txt, as a PNG next to it."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PLOT_NAME = "training_curves.png"


def read_log(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def plot_curves(output_dir: str) -> str | None:
    """Plot train/test loss and test top-1 (model and EMA) per epoch; returns the PNG path."""
    rows = [r for r in read_log(os.path.join(output_dir, "log.txt")) if "epoch" in r]
    if not rows:
        return None
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("test_loss", "val loss"), ("test_loss_ema", "val loss (EMA)")):
        if any(key in r for r in rows):
            ax_loss.plot(epochs, [r.get(key, float("nan")) for r in rows], marker="o", label=label)
    for key, label in (("test_acc1", "val top-1"), ("test_acc5", "val top-5"), ("test_acc1_ema", "val top-1 (EMA)")):
        if any(key in r for r in rows):
            ax_acc.plot(epochs, [r.get(key, float("nan")) for r in rows], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    path = os.path.join(output_dir, PLOT_NAME)
    tmp = os.path.join(output_dir, f".{PLOT_NAME}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
