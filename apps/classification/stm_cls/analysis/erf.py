"""Effective receptive fields of each stage (after RepLKNet's method, as the study used it).

Images are resized to E x E with E = 2 S (448 px for 224 px models; bicubic, no crop) and normalised;
the model is built for E x E (its tables and position embeddings are interpolated by the checkpoint
loader) and kept in eval mode. For each stage s, take the stage's output in the classification graph
(after its stage norm; timm's ``forward_intermediates``) and y = sum over channels of
ReLU(output[:, :, H//2, W//2]); the image's map is ReLU(dy/d input) summed over the RGB channels.
Maps containing NaN are skipped; the others are summed over N images (the study: 500). The images of
a batch are independent in eval mode, so one backward of the batch's summed y gives every image's
own gradient.

Summary per stage: m = log10(mean map + 1), divided by its maximum; for t in 0.2, 0.3, 0.5, 0.99 the
smallest centred square of odd side 2i + 1 whose sum exceeds t of the total sum; reported as its side
ratio (side / E) and area ratio (side ratio squared).

``reference_quirks=True``: the original's image counter advanced once per stage, so asking for N
images used N // 4.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from . import common

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def erf_size(input_size: int) -> int:
    return 2 * input_size


class SquareResize:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, index: int) -> torch.Tensor:
        img = TF.resize(img.convert("RGB"), [self.size, self.size], interpolation=InterpolationMode.BICUBIC)
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def stage_features(model: torch.nn.Module, stages) -> callable:
    """fn(normalised images) -> [stage outputs] for the requested 0-based stage indices."""
    inner = model.model if isinstance(model, common.Normalized) else model
    if not hasattr(inner, "forward_intermediates"):
        raise common.AnalysisError(f"{type(inner).__name__} has no forward_intermediates(): the ERF needs stage outputs")

    def fn(x: torch.Tensor) -> list[torch.Tensor]:
        # norm=True: each stage output after its stage norm (timm semantics; norm=False gives the raw output)
        return inner.forward_intermediates(x, indices=list(stages), norm=True, intermediates_only=True)

    return fn


def batch_maps(features_fn, images: torch.Tensor) -> list[torch.Tensor]:
    """Per-image gradient maps of every stage: a list (per stage) of (B, H, W) float64 tensors.

    ``features_fn`` maps the (already normalised) image batch to a list of NCHW feature maps.
    """
    x = images.detach().clone().requires_grad_(True)
    feats = features_fn(x)
    maps = []
    for n, f in enumerate(feats):
        h, w = f.shape[-2:]
        y = torch.relu(f[:, :, h // 2, w // 2].float()).sum()
        (grad,) = torch.autograd.grad(y, x, retain_graph=n + 1 < len(feats))
        maps.append(torch.relu(grad.float()).sum(dim=1).double())
    return maps


def smallest_square(m: np.ndarray, threshold: float) -> int:
    """Side (odd) of the smallest square centred at (H//2, W//2) holding more than ``threshold`` of the
    sum of ``m``, capped at the map's larger side (a square reaching past the border of an even-sized
    map covers the whole map)."""
    h, w = m.shape
    total = float(m.sum())
    ch, cw = h // 2, w // 2
    for i in range(max(h, w)):
        part = m[max(ch - i, 0):ch + i + 1, max(cw - i, 0):cw + i + 1].sum()
        if part > threshold * total:
            return min(2 * i + 1, max(h, w))
        if ch - i <= 0 and cw - i <= 0 and ch + i + 1 >= h and cw + i + 1 >= w:
            break
    return max(h, w)


def summarize_map(mean_map: np.ndarray) -> dict:
    m = np.log10(mean_map + 1.0)
    peak = m.max()
    m = m / peak if peak > 0 else m
    side = mean_map.shape[0]
    out = {}
    for t in THRESHOLDS:
        s = smallest_square(m, t)
        out[str(t)] = {"side": s, "side_ratio": s / side, "area_ratio": (s / side) ** 2}
    return out


def run(models: dict[str, torch.nn.Module], dataset, indices, *, size: int, batch_size: int, num_workers: int,
        device: torch.device, quirks: bool, stages=(0, 1, 2, 3)) -> tuple[dict, dict]:
    """Returns (summary per model per stage, mean maps per model per stage as numpy arrays)."""
    if quirks:
        indices = list(indices)[: max(1, len(indices) // len(stages))]
    loader = common.make_loader(common.ViewDataset(dataset, indices, SquareResize(size)), batch_size, num_workers)
    partial = {label: {} for label in models}  # batch number -> (per-stage sums, per-stage counts)
    fns = {label: stage_features(model, stages) for label, model in models.items()}
    log = common.progress(f"erf ({len(indices)} images at {size}px)", len(loader))
    for i, (images, _, positions) in enumerate(loader):
        log.mark_data()
        batch_no = int(positions[0]) // batch_size
        x = images.to(device).float().div_(255.0)
        for label, model in models.items():
            maps = batch_maps(fns[label], model.normalize(x))
            sums, counts = [], []
            for stage_maps in maps:
                ok = ~torch.isnan(stage_maps).flatten(1).any(dim=1)
                sums.append(stage_maps[ok].sum(dim=0).cpu().numpy())
                counts.append(int(ok.sum()))
            partial[label][batch_no] = (sums, counts)
        log.step(i)
    summaries, mean_maps = {}, {}
    for label in models:
        gathered = common.gather_by_key(partial[label])
        summaries[label], mean_maps[label] = {}, {}
        for n, stage in enumerate(stages):
            total = np.zeros((size, size), dtype=np.float64)
            count = 0
            for b in sorted(gathered):  # fixed order: the same sums as a single process
                total += gathered[b][0][n]
                count += gathered[b][1][n]
            mean = total / max(count, 1)
            key = f"stage{stage + 1}"
            mean_maps[label][key] = mean
            summaries[label][key] = {"num_images": count, **summarize_map(mean)}
    return summaries, mean_maps


def csv_rows(summaries: dict) -> list[dict]:
    rows = []
    for model, stages in summaries.items():
        for stage, s in stages.items():
            for t in THRESHOLDS:
                rows.append({"model": model, "stage": stage, "threshold": t, "side": s[str(t)]["side"],
                             "side_ratio": s[str(t)]["side_ratio"], "area_ratio": s[str(t)]["area_ratio"],
                             "num_images": s["num_images"]})
    return rows


def plot(summaries: dict, mean_maps: dict, path_maps: str, path_bars: str) -> None:
    """A model-by-stage grid of the normalised log maps (viridis), and the area ratios as bars."""
    plt = common.pyplot()
    models = list(mean_maps)
    stages = list(next(iter(mean_maps.values())))
    fig, axes = plt.subplots(len(models), len(stages), figsize=(2.2 * len(stages), 2.2 * len(models)), squeeze=False)
    for r, model in enumerate(models):
        for c, stage in enumerate(stages):
            m = np.log10(mean_maps[model][stage] + 1.0)
            m = m / m.max() if m.max() > 0 else m
            ax = axes[r][c]
            ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(stage)
            if c == 0:
                ax.set_ylabel(model.replace("unified_", ""), fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path_maps, dpi=60)

    fig, axes = plt.subplots(1, len(THRESHOLDS), figsize=(3.2 * len(THRESHOLDS), 3.0), squeeze=False)
    width = 0.8 / max(len(models), 1)
    for c, t in enumerate(THRESHOLDS):
        ax = axes[0][c]
        for k, model in enumerate(models):
            values = [summaries[model][s][str(t)]["area_ratio"] for s in stages]
            ax.bar(np.arange(len(stages)) + (k - (len(models) - 1) / 2) * width, values, width,
                   label=model.replace("unified_", ""))
        ax.set_xticks(np.arange(len(stages)), stages, fontsize=8)
        ax.set_title(f"area ratio at t={t}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path_bars)


def theoretical_side(num_layers: int, kernel: int) -> int:
    """Receptive-field side of num_layers stacked stride-1 kernel x kernel convolutions."""
    return 1 + num_layers * (kernel - 1)

