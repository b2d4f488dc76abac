"""LazyConfig (``configs/lazy/*.py``) training and evaluation for ``train_net.py``.

A LazyConfig file defines ``model``, ``dataloader`` (``train``, ``test``, ``evaluator``), ``optimizer``,
``lr_multiplier`` and ``train`` (detectron2's ``common/train.py`` keys), as detectron2's own
``configs/common`` files do; command-line ``key=value`` pairs override any of them
(``train.max_iter=100 model.backbone.bottom_up.name=unified_swin_tiny``). The training loop is detectron2's
``SimpleTrainer`` / ``AMPTrainer`` with the same hooks as the yacs path: atomic checkpoints with the
resume fallback, evaluation, an optional ``BestCheckpointer`` (``train.best_checkpoint.metric``) and the
writers every ``train.log_period`` iterations.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch

from .checkpoint import AtomicCheckpointer, CheckpointError, atomic_write_text
from .config import ConfigError, check_model_name
from .data import DatasetError, SkipBadImages, prepare_datasets
from .trainer import build_param_groups, evaluator_for_dataset

logger = logging.getLogger("stm_det")

__all__ = ["adamw_param_groups", "lazy_evaluator", "main", "skip_bad_images"]


# --------------------------------------------------------------------------------------------------
# Callables that the LazyConfig files instantiate
# --------------------------------------------------------------------------------------------------

def adamw_param_groups(model: torch.nn.Module, weight_decay: float, no_decay_keys: Sequence[str],
                       no_decay_norm_layers: bool = False, no_decay_position_tables: bool = True) -> list[dict]:
    """The recipe's two parameter groups (see :func:`stm_det.trainer.build_param_groups`)."""
    return build_param_groups(model, weight_decay, list(no_decay_keys), no_decay_norm_layers,
                              no_decay_position_tables)


def skip_bad_images(mapper, max_bad: int = 10) -> SkipBadImages:
    """A training mapper that skips unreadable images (see :class:`stm_det.data.SkipBadImages`)."""
    return SkipBadImages(mapper, max_bad)


def lazy_evaluator(dataset_name, output_dir: str, mask_on: bool = True, max_dets_per_image: int = 100):
    """The evaluator that fits the dataset's type (:func:`stm_det.trainer.evaluator_for_dataset`);
    `dataset_name` may be a one-element list/tuple, as ``get_detection_dataset_dicts(names=...)`` takes."""
    names = _names(dataset_name)
    if len(names) != 1:
        raise DatasetError(f"dataloader.test.dataset.names must name one dataset for evaluation, got {names}")
    return evaluator_for_dataset(names[0], os.path.join(output_dir, "inference", names[0]), mask_on=mask_on,
                                 max_dets_per_image=max_dets_per_image)


def _names(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


# --------------------------------------------------------------------------------------------------
# train_net.py --config-file X.py
# --------------------------------------------------------------------------------------------------

def load(args):
    """The LazyConfig of `args` with the command-line overrides applied and the datasets it names
    registered and checked (no output written yet)."""
    from detectron2.config import LazyConfig

    try:
        cfg = LazyConfig.load(args.config_file)
        cfg = LazyConfig.apply_overrides(cfg, list(args.opts or []))
    except (KeyError, ValueError, SyntaxError, ImportError, AttributeError) as e:
        raise ConfigError(f"LazyConfig {args.config_file} + {list(args.opts or [])}: {type(e).__name__}: {e}") from None
    bottom_up = cfg.model.backbone.get("bottom_up", None) if "backbone" in cfg.model else None
    if bottom_up is not None and "name" in bottom_up:
        check_model_name(bottom_up.name)
    used = _names(cfg.dataloader.test.dataset.names) if "test" in cfg.dataloader else []
    if not args.eval_only:
        used = _names(cfg.dataloader.train.dataset.names) + used
    prepare_datasets(None, args.register_coco, used)
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        print("[stm_det] CUDA is not available: train.device cuda -> cpu")
        cfg.train.device = "cpu"
    return cfg


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader or "test" not in cfg.dataloader:
        return {}
    from detectron2.config import instantiate
    from detectron2.evaluation import inference_on_dataset, print_csv_format

    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if results:
        print_csv_format(results)
    return results


def do_train(args, cfg):
    import detectron2.utils.comm as comm
    from detectron2.config import instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, create_ddp_model, default_writers, hooks

    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = AtomicCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    best = cfg.train.get("best_checkpoint", {}) or {}
    eval_period = cfg.train.eval_period
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if comm.is_main_process() else None,
        hooks.EvalHook(eval_period, lambda: do_test(cfg, model)),
        hooks.BestCheckpointer(eval_period, checkpointer, best["metric"], mode=best.get("mode", "max"))
        if best.get("metric") and comm.is_main_process() else None,
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if args.resume and start_iter >= cfg.train.max_iter and comm.is_main_process():
        checkpointer.ensure_final(trainer.iter)
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    import detectron2.utils.comm as comm
    from detectron2.config import instantiate
    from detectron2.engine import create_ddp_model, default_setup

    cfg = load(args)
    default_setup(cfg, args)
    from detectron2.utils.logger import setup_logger

    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="stm_det", abbrev_name="stm_det")
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        weights = cfg.train.init_checkpoint
        if not weights and not args.resume:
            raise CheckpointError("--eval-only needs weights: train.init_checkpoint=PATH (or --resume)")
        AtomicCheckpointer(model, cfg.train.output_dir).resume_or_load(weights, resume=args.resume)
        res = do_test(cfg, model)
        if comm.is_main_process():
            atomic_write_text(json.dumps(res, indent=2), os.path.join(cfg.train.output_dir, "eval_results.json"))
        return res
    return do_train(args, cfg)
