"""DefaultTrainer with the recipe's optimizer (AdamW, no decay on norms / position embeddings /
relative position tables) and COCO evaluation."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import maybe_add_gradient_clipping

logger = logging.getLogger(__name__)


def _is_norm_layer(module: torch.nn.Module) -> bool:
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.LocalResponseNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def build_param_groups(model: torch.nn.Module, weight_decay: float, no_decay_keys: Sequence[str],
                       no_decay_norm_layers: bool = False) -> list[dict]:
    """Two parameter groups: weight decay 0 for every trainable parameter whose full name contains
    one of `no_decay_keys` (substring match, as mmcv's paramwise custom_keys) or, with
    `no_decay_norm_layers`, that belongs to a normalisation layer whatever its name; `weight_decay`
    for the rest. Each group also lists its parameter names (key "param_names")."""
    norm_params = set()
    if no_decay_norm_layers:
        norm_params = {id(p) for m in model.modules() if _is_norm_layer(m) for p in m.parameters(recurse=False)}
    decay, no_decay = {"params": [], "param_names": []}, {"params": [], "param_names": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        group = no_decay if id(p) in norm_params or any(k in name for k in no_decay_keys) else decay
        group["params"].append(p)
        group["param_names"].append(name)
    decay["weight_decay"] = float(weight_decay)
    no_decay["weight_decay"] = 0.0
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.NO_DECAY_KEYS,
                                cfg.SOLVER.NO_DECAY_NORM_LAYERS)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(
            groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS), eps=cfg.SOLVER.EPS)
    if name == "SGD":
        return maybe_add_gradient_clipping(cfg, torch.optim.SGD)(
            groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
    raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")


def _coco_fast_eval_available() -> bool:
    """detectron2's C++ COCOeval when the compiled extension is there; pycocotools' own COCOeval with
    a pure-Python ``detectron2._C`` (same numbers, the reference implementation)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    if getattr(_C, "STM_PURE_PYTHON_BUILD", False):
        return False
    return hasattr(_C, "COCOevalEvaluateImages") and hasattr(_C, "COCOevalAccumulate")


class Trainer(DefaultTrainer):
    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = build_optimizer(cfg, model)
        for g in optimizer.param_groups:
            logger.info("Optimizer group: %d tensors, weight_decay %g", len(g["params"]), g["weight_decay"])
        return optimizer

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder,
                             max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE, use_fast_impl=_coco_fast_eval_available())

    def build_hooks(self):
        ret = super().build_hooks()
        for h in ret:  # detectron2 writes every 20 iterations; make it configurable (recipe: 50)
            if isinstance(h, hooks.PeriodicWriter):
                h._period = self.cfg.LOG_PERIOD
        return ret
