"""Optimizer parameter groups (weight-decay exclusions, layer-wise LR decay) and per-iteration schedules."""

from __future__ import annotations

import math

import numpy as np
import torch
from timm.optim import create_optimizer_v2

NUM_DECAY_LAYERS = 14  # layer ids 0..13 of the meta architecture (see layer_id)


def layer_id(name: str) -> int:
    """Layer index used for layer-wise LR decay on the unified meta architecture.

    downsample_layers.0 (stem) -> 0, stages.0/1 -> 1/2, downsample_layers.1/2 -> 2/3,
    stages.2.j -> 3 + j // 3, downsample_layers.3 and stages.3 -> 12, everything else -> 13.
    """
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
    if parts[0] == "stages":
        stage = int(parts[1])
        if stage in (0, 1):
            return stage + 1
        if stage == 2:
            lid = 3 + int(parts[2]) // 3
            if lid > 11:  # the reference would index out of range here; fail with a reason instead
                raise ValueError(f"--layer_decay supports at most 27 blocks in stage 2 ({name})")
            return lid
        return 12
    return NUM_DECAY_LAYERS - 1


def skips_weight_decay(name: str, param: torch.Tensor, skip: set[str]) -> bool:
    """1-D tensors (norms, biases, 1-D layer scales), '.bias', and the model's no_weight_decay() names."""
    return param.ndim == 1 or name.endswith(".bias") or name in skip


def param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    scales = None
    if layer_decay != 1.0:
        scales = [layer_decay ** (NUM_DECAY_LAYERS - 1 - i) for i in range(NUM_DECAY_LAYERS)]
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = skips_weight_decay(name, param, skip)
        kind = "no_decay" if no_decay else "decay"
        key, scale = kind, 1.0
        if scales is not None:
            lid = layer_id(name)
            key, scale = f"layer_{lid}_{kind}", scales[lid]
        if key not in groups:
            groups[key] = dict(params=[], param_names=[], weight_decay=0.0 if no_decay else weight_decay,
                               lr_scale=scale, group_name=key)
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


def build_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory on our own groups (each group carries its own weight_decay/lr_scale)."""
    groups = param_groups(model, args.weight_decay, args.layer_decay)
    for g in groups:
        g.pop("param_names")
    kwargs = dict(eps=args.opt_eps) if args.opt_eps is not None else {}
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    opt_name = args.opt.lower()
    base = opt_name.split("_", 1)[-1] if opt_name.startswith("lookahead_") else opt_name
    if base in ("sgd", "nesterov", "momentum", "adadelta", "adafactor"):
        kwargs.pop("betas", None)
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=0.0, momentum=args.momentum,
                               **kwargs)


def cosine_schedule(base_value: float, final_value: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: float = 0, start_warmup_value: float = 0.0, warmup_steps: int = -1) -> np.ndarray:
    """One value per iteration: linear warmup (both endpoints included), then a half cosine.

    warmup = linspace(start_warmup_value, base_value, warmup_iters) with
    warmup_iters = warmup_steps if > 0 else warmup_epochs * iters_per_epoch; afterwards
    v[i] = final + 0.5 (base - final) (1 + cos(pi i / T)), i = 0..T-1, T = total - warmup_iters.
    """
    total = epochs * iters_per_epoch
    warmup_iters = warmup_steps if warmup_steps > 0 else int(warmup_epochs * iters_per_epoch)
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    n = total - warmup_iters
    steps = np.arange(n)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * steps / max(n, 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total, (len(schedule), total)
    return schedule


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float | None, wd: float | None) -> None:
    """Write the scheduled LR (times each group's lr_scale) and WD (only into decaying groups)."""
    for group in optimizer.param_groups:
        if lr is not None:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if wd is not None and group["weight_decay"] > 0:
            group["weight_decay"] = wd
