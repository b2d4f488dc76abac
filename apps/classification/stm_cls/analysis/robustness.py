"""White-box adversarial robustness: top-1 under FGSM and PGD (L-infinity) against eps.

The study reports robustness but published neither protocol nor code, so this is the common one:
attacks in pixel space on the evaluation view (resize to int(S / crop_pct), centre-crop S; values in
[0, 1], before normalisation, clamped to [0, 1]), model in eval mode, cross-entropy against the label.

* FGSM: x + eps * sign(grad).
* PGD: a uniform random start in [-eps, eps] (drawn per image from a generator seeded with (seed,
  image index, eps), so results do not depend on batching or sharding), then ``steps`` (10) steps of
  ``eps * step_ratio`` (eps / 4) along the gradient sign, each projected back onto the eps-ball around
  the image and onto [0, 1]. The last iterate is evaluated.

eps is given in units of 1/255 (default 0, 0.5, 1, 2, 4; 0 is the clean accuracy and a sanity check).
The loss is summed over the batch, so each image's gradient is its own loss's gradient; under float16
autocast it is also multiplied by a constant (only its sign is used) so that small gradients do not
underflow.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import common
from .invariance import ViewMaker

DEFAULT_EPS = (0.0, 0.5, 1.0, 2.0, 4.0)
ATTACKS = ("fgsm", "pgd")
FP16_LOSS_SCALE = 1024.0


def input_gradient(model, x: torch.Tensor, labels: torch.Tensor, device, use_amp: bool) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with common.autocast(device, use_amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    if use_amp and device.type == "cuda":
        loss = loss * FP16_LOSS_SCALE
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model, x, labels, eps: float, device=torch.device("cpu"), use_amp: bool = False) -> torch.Tensor:
    """eps in [0, 1] pixel units."""
    if eps == 0:
        return x.clone()
    grad = input_gradient(model, x, labels, device, use_amp)
    return (x + eps * grad.sign()).clamp_(0.0, 1.0).detach()


def random_start(shape, eps: float, seed: int, indices, eps_index: int) -> torch.Tensor:
    noise = [np.random.default_rng([seed, int(i), eps_index]).uniform(-1.0, 1.0, size=shape[1:]) for i in indices]
    return torch.from_numpy(np.stack(noise).astype(np.float32)) * eps


def pgd(model, x, labels, eps: float, *, steps: int = 10, step_ratio: float = 0.25, start: torch.Tensor | None = None,
        device=torch.device("cpu"), use_amp: bool = False) -> torch.Tensor:
    """L-infinity PGD from ``start`` (a perturbation in [-eps, eps]; zero when None)."""
    if eps == 0:
        return x.clone()
    alpha = eps * step_ratio
    adv = x if start is None else (x + start.to(x.device)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = input_gradient(model, adv, labels, device, use_amp)
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp_(0.0, 1.0)
    return adv.detach()


@torch.no_grad()
def correct(model, x, labels, device, use_amp: bool) -> torch.Tensor:
    with common.autocast(device, use_amp):
        logits = model(x)
    return (logits.float().argmax(dim=1) == labels).cpu()


def run(models: dict[str, torch.nn.Module], dataset, indices, *, size: int, crop_pct: float, batch_size: int,
        num_workers: int, device: torch.device, use_amp: bool, seed: int, eps_list=DEFAULT_EPS,
        attacks=ATTACKS, steps: int = 10, step_ratio: float = 0.25) -> dict:
    maker = ViewMaker(size, crop_pct, transforms=(), seed=seed)
    loader = common.make_loader(common.ViewDataset(dataset, indices, maker), batch_size, num_workers)
    per_sample = {label: {} for label in models}  # position -> [clean, fgsm per eps..., pgd per eps...]
    log = common.progress(f"robustness ({len(indices)} images, eps {list(eps_list)}/255)", len(loader))
    for i, (views, labels, positions) in enumerate(loader):
        log.mark_data()
        x = views[:, 0].to(device).float().div_(255.0)
        y = labels.to(device)
        image_ids = [loader.dataset.indices[p] for p in positions.tolist()]
        for label, model in models.items():
            columns = [correct(model, x, y, device, use_amp)]
            for attack in attacks:
                for e_idx, eps in enumerate(eps_list):
                    e = eps / 255.0
                    if attack == "fgsm":
                        adv = fgsm(model, x, y, e, device, use_amp)
                    else:
                        start = random_start(x.shape, e, seed, image_ids, e_idx)
                        adv = pgd(model, x, y, e, steps=steps, step_ratio=step_ratio, start=start, device=device,
                                  use_amp=use_amp)
                    columns.append(correct(model, adv, y, device, use_amp))
            table = torch.stack(columns, dim=1).numpy()
            for b, p in enumerate(positions.tolist()):
                per_sample[label][p] = table[b]
        log.step(i)
    results = {}
    for label in models:
        gathered = common.gather_by_key(per_sample[label])
        rows = np.stack([gathered[p] for p in sorted(gathered)]).astype(np.float64)
        acc = 100.0 * rows.mean(axis=0)
        res = {"num_images": int(rows.shape[0]), "clean_top1": float(acc[0]), "eps_units": "1/255",
               "pgd_steps": steps, "pgd_step_size": f"eps*{step_ratio}"}
        col = 1
        for attack in attacks:
            res[attack] = [{"eps": float(eps), "top1": float(acc[col + k])} for k, eps in enumerate(eps_list)]
            col += len(eps_list)
        results[label] = res
    return results


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for model, res in results.items():
        for attack in ATTACKS:
            for e in res.get(attack, []):
                rows.append({"model": model, "attack": attack, "eps_255": e["eps"], "top1": e["top1"],
                             "clean_top1": res["clean_top1"]})
    return rows


def plot(results: dict, path: str) -> None:
    plt = common.pyplot()
    attacks = [a for a in ATTACKS if any(a in r for r in results.values())]
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.4), squeeze=False)
    for c, attack in enumerate(attacks):
        ax = axes[0][c]
        for model, res in results.items():
            entries = res.get(attack, [])
            ax.plot([e["eps"] for e in entries], [e["top1"] for e in entries], marker="o",
                    label=model.replace("unified_", ""))
        ax.set(title=attack.upper(), xlabel="eps (x 1/255)", ylabel="top-1 (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)
