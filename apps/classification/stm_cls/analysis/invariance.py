"""Invariance of predictions to translation, rotation (before and after the crop) and scale.

Protocol (the study's, at input size S; pixel distances are given for 224 px and scaled by S/224):

* reference view: resize the short side to int(S / crop_pct) (bicubic), centre-crop S x S;
* ``translation``: strengths 0, 4, ..., 64 px. The crop window's centre moves by the strength along
  one of 8 directions (4 axes, 4 diagonals with the strength on both axes), drawn per image and per
  strength from a generator seeded with (seed, image index, setting). The part of the moved window
  inside the resized image is kept and zero-padded evenly to S x S (black before normalisation);
* ``pre_rotation``: resize, rotate (bicubic, counter-clockwise, no expansion, fill 0), centre-crop;
  ``post_rotation``: resize, centre-crop, rotate. Angles 0, 5, ..., 90 degrees;
* ``scale``: crop ratio r = 0.2, 0.325, ..., 1.95: resize the short side to int(S / r), centre-crop
  S x S (zero-padded where r > 1).

Per setting: top-1 and top-5 (%) against the label, ``consistency`` (% of images whose top-1 class is
the top-1 class of their own reference view) and ``soft_ce`` (mean cross-entropy of the view's logits
against the softmax of the reference view's logits). ``strength`` is the protocol's value (px at
224, degrees, crop ratio); translation settings also give ``shift_px``, the pixels used at size S.

``reference_quirks=True`` reproduces the original script: directions drawn from 7 of the 8, and the
post-rotation views reported under ``pre_rotation`` too (its pre-rotation results were post-rotation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from . import common

TRANSFORMS = ("translation", "pre_rotation", "post_rotation", "scale")
TRANSLATION_STRENGTHS = tuple(range(0, 65, 4))  # px at 224
ROTATION_ANGLES = tuple(range(0, 91, 5))  # degrees
SCALE_RATIOS = tuple(round(0.2 + 0.125 * k, 3) for k in range(15))  # 0.2 ... 1.95
# (dx, dy): right, down, left, up, then the diagonals. The original drew randint(0, 7): never the last.
DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1))


def settings(transform: str) -> tuple:
    return {"translation": TRANSLATION_STRENGTHS, "pre_rotation": ROTATION_ANGLES,
            "post_rotation": ROTATION_ANGLES, "scale": SCALE_RATIOS}[transform]


# --------------------------------------------------------------------------------------------------
# Views (uint8 CHW tensors in pixel space)
# --------------------------------------------------------------------------------------------------

def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def resize_short(img: Image.Image, short: int) -> Image.Image:
    return TF.resize(img, short, interpolation=InterpolationMode.BICUBIC)


def center_box(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of torchvision's centre crop of ``size`` from a height x width image."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def shifted_crop(image: torch.Tensor, size: int, dx: int, dy: int) -> torch.Tensor:
    """The size x size window centred dx px right and dy px below the centre crop's; the part inside
    the image is kept and zero-padded evenly (left/top get the smaller half, as torchvision's padding
    centre crop does)."""
    height, width = image.shape[-2:]
    top, left = center_box(height, width, size)
    top, left = top + dy, left + dx
    t0, t1 = max(top, 0), min(top + size, height)
    l0, l1 = max(left, 0), min(left + size, width)
    part = image[..., t0:max(t1, t0), l0:max(l1, l0)]
    ph, pw = size - part.shape[-2], size - part.shape[-1]
    return F.pad(part, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def rotate(img: Image.Image, angle: float) -> Image.Image:
    """Counter-clockwise, bicubic, same canvas, black fill."""
    return TF.rotate(img, angle, interpolation=InterpolationMode.BICUBIC, expand=False, fill=0)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    return TF.center_crop(img, [size, size])  # pads with zeros when the image is smaller


def translation_direction(seed: int, index: int, setting: int, quirks: bool) -> tuple[int, int]:
    rng = np.random.default_rng([seed, index, setting])
    return DIRECTIONS[int(rng.integers(0, 7 if quirks else 8))]


class ViewMaker:
    """Builds every view of one image: the reference first, then each transform's settings in order."""

    def __init__(self, size: int, crop_pct: float, transforms=TRANSFORMS, seed: int = 0, quirks: bool = False):
        self.size, self.crop_pct, self.transforms = size, crop_pct, tuple(transforms)
        self.seed, self.quirks = seed, quirks
        self.resize_to = int(size / crop_pct)

    def counts(self) -> list[int]:
        return [len(settings(t)) for t in self.transforms]

    def reference(self, resized: Image.Image) -> torch.Tensor:
        return to_uint8_tensor(center_crop(resized, self.size))

    def translation(self, resized_tensor: torch.Tensor, index: int) -> list[torch.Tensor]:
        views = []
        for k, strength in enumerate(TRANSLATION_STRENGTHS):
            px = round(strength * common.pixel_scale(self.size))
            dx, dy = translation_direction(self.seed, index, k, self.quirks)
            views.append(shifted_crop(resized_tensor, self.size, dx * px, dy * px))
        return views

    def pre_rotation(self, resized: Image.Image) -> list[torch.Tensor]:
        if self.quirks:  # the original reported post-rotation results under this name
            return self.post_rotation(resized)
        return [to_uint8_tensor(center_crop(rotate(resized, a), self.size)) for a in ROTATION_ANGLES]

    def post_rotation(self, resized: Image.Image) -> list[torch.Tensor]:
        crop = center_crop(resized, self.size)
        return [to_uint8_tensor(rotate(crop, a)) for a in ROTATION_ANGLES]

    def scale(self, img: Image.Image) -> list[torch.Tensor]:
        return [to_uint8_tensor(center_crop(resize_short(img, int(self.size / r)), self.size)) for r in SCALE_RATIOS]

    def __call__(self, img: Image.Image, index: int) -> torch.Tensor:
        resized = resize_short(img, self.resize_to)
        views = [self.reference(resized)]
        for t in self.transforms:
            if t == "translation":
                views += self.translation(to_uint8_tensor(resized), index)
            elif t == "scale":
                views += self.scale(img)
            else:
                views += getattr(self, t)(resized)
        return torch.stack(views)  # (1 + sum(counts), 3, S, S) uint8


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def per_sample_metrics(logits: torch.Tensor, label: int) -> np.ndarray:
    """Rows = views (row 0 the reference); columns = top-1 hit, top-5 hit, consistency, soft CE."""
    logits = logits.float()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit1 = (top[:, 0] == label)
    hit5 = (top == label).any(dim=1)
    consistent = top[:, 0] == top[0, 0]
    soft_ce = -(logits[:1].softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)
    return torch.stack([hit1.double(), hit5.double(), consistent.double(), soft_ce.double()], dim=1).cpu().numpy()


def summarize(per_sample: dict[int, np.ndarray], transforms, counts) -> dict:
    """Average the gathered per-image rows in position order (so the sum order never depends on ranks)."""
    rows = np.stack([per_sample[p] for p in sorted(per_sample)])  # (N, V, 4)
    mean = rows.mean(axis=0)
    out = {"num_images": int(rows.shape[0]), "clean_top1": 100.0 * mean[0, 0], "clean_top5": 100.0 * mean[0, 1]}
    start = 1
    for t, n in zip(transforms, counts):
        entries = []
        for j, strength in enumerate(settings(t)):
            m = mean[start + j]
            entry = {"strength": strength, "top1": 100.0 * m[0], "top5": 100.0 * m[1],
                     "consistency": 100.0 * m[2], "soft_ce": float(m[3])}
            entries.append(entry)
        out[t] = entries
        start += n
    return out


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def run(models: dict[str, torch.nn.Module], dataset, indices, *, size: int, crop_pct: float, batch_size: int,
        num_workers: int, device: torch.device, use_amp: bool, seed: int, quirks: bool,
        transforms=TRANSFORMS) -> dict:
    """``models``: label -> Normalized classifier. Returns {label: summary} (see ``summarize``)."""
    maker = ViewMaker(size, crop_pct, transforms, seed, quirks)
    counts = maker.counts()
    n_views = 1 + sum(counts)
    images_per_batch = max(1, batch_size // n_views)  # about batch_size views per forward pass
    loader = common.make_loader(common.ViewDataset(dataset, indices, maker), images_per_batch, num_workers)
    per_sample = {label: {} for label in models}
    log = common.progress(f"invariance ({len(indices)} images x {n_views} views)", len(loader))
    for i, (views, labels, positions) in enumerate(loader):
        log.mark_data()
        flat = views.to(device).flatten(0, 1).float().div_(255.0)
        for label, model in models.items():
            with common.autocast(device, use_amp):
                logits = model(flat)
            logits = logits.float().view(views.shape[0], n_views, -1)
            for b in range(views.shape[0]):
                per_sample[label][int(positions[b])] = per_sample_metrics(logits[b], int(labels[b]))
        log.step(i)
    results = {}
    for label in models:
        gathered = common.gather_by_key(per_sample[label])
        results[label] = summarize(gathered, maker.transforms, counts)
        results[label]["strength_units"] = {"translation": "px at 224 (shift_px at this size)",
                                            "pre_rotation": "degrees", "post_rotation": "degrees",
                                            "scale": "crop ratio"}
        if "translation" in results[label]:
            for entry in results[label]["translation"]:
                entry["shift_px"] = round(entry["strength"] * common.pixel_scale(size))
    return results


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for model, res in results.items():
        rows.append({"model": model, "transform": "clean", "strength": "", "top1": res["clean_top1"],
                     "top5": res["clean_top5"], "consistency": 100.0, "soft_ce": ""})
        for t in TRANSFORMS:
            for e in res.get(t, []):
                rows.append({"model": model, "transform": t, "strength": e["strength"], "top1": e["top1"],
                             "top5": e["top5"], "consistency": e["consistency"], "soft_ce": e["soft_ce"]})
    return rows


def plot(results: dict, path: str, title: str = "") -> None:
    """Rows: top-1, consistency, soft CE; columns: the transforms; one line per model."""
    plt = common.pyplot()
    transforms = [t for t in TRANSFORMS if any(t in r for r in results.values())]
    metrics = (("top1", "top-1 (%)"), ("consistency", "consistency (%)"), ("soft_ce", "soft CE vs reference"))
    xlabels = {"translation": "shift (px at 224)", "pre_rotation": "angle (deg)", "post_rotation": "angle (deg)",
               "scale": "crop ratio"}
    fig, axes = plt.subplots(len(metrics), len(transforms), figsize=(3.6 * len(transforms), 2.6 * len(metrics)),
                             squeeze=False)
    for c, t in enumerate(transforms):
        for r, (key, ylabel) in enumerate(metrics):
            ax = axes[r][c]
            for model, res in results.items():
                entries = res.get(t, [])
                ax.plot([e["strength"] for e in entries], [e[key] for e in entries], marker=".", label=model)
            if r == 0:
                ax.set_title(t.replace("_", "-"))
            if r == len(metrics) - 1:
                ax.set_xlabel(xlabels[t])
            if c == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    common.save_figure(fig, path)
