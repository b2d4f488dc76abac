"""DefaultTrainer with the recipe's optimizer (AdamW, no decay on norms and on the position tables that the
backbone's mixer family declares), evaluators chosen by dataset type, and crash-safe checkpoints."""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Sequence

import detectron2.utils.comm as comm
import torch
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.nn.precise_bn import get_bn_modules

from .checkpoint import AtomicCheckpointer
from .data import DatasetError, SkipBadImages

logger = logging.getLogger(__name__)


def _is_norm_layer(module: torch.nn.Module) -> bool:
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.LocalResponseNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def position_table_names(model: torch.nn.Module) -> set[str]:
    """Full names (relative to `model`) of the position tables of every module that declares some with a
    `position_tables()` method: the unified trunks (`MetaArch.position_tables()`, which asks the mixer family),
    e.g. "backbone.bottom_up.body.stages.0.0.attn.pos_embed.height_rel"."""
    names = set()
    for prefix, module in model.named_modules():
        tables = getattr(module, "position_tables", None)
        if callable(tables):
            names.update(f"{prefix}.{name}" if prefix else name for name in tables())
    return names


def build_param_groups(model: torch.nn.Module, weight_decay: float, no_decay_keys: Sequence[str],
                       no_decay_norm_layers: bool = False, no_decay_position_tables: bool = True) -> list[dict]:
    """Two parameter groups: weight decay 0 for every trainable parameter whose full name contains
    one of `no_decay_keys` (substring match, as mmcv's paramwise custom_keys), with
    `no_decay_position_tables` for the backbone family's position tables (:func:`position_table_names`),
    and with `no_decay_norm_layers` for the parameters of normalisation layers whatever their names;
    `weight_decay` for the rest. Each group also lists its parameter names (key "param_names")."""
    norm_params = set()
    if no_decay_norm_layers:
        norm_params = {id(p) for m in model.modules() if _is_norm_layer(m) for p in m.parameters(recurse=False)}
    tables = position_table_names(model) if no_decay_position_tables else set()
    decay, no_decay = {"params": [], "param_names": []}, {"params": [], "param_names": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = id(p) in norm_params or name in tables or any(k in name for k in no_decay_keys)
        group = no_decay if exempt else decay
        group["params"].append(p)
        group["param_names"].append(name)
    decay["weight_decay"] = float(weight_decay)
    no_decay["weight_decay"] = 0.0
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.NO_DECAY_KEYS,
                                cfg.SOLVER.NO_DECAY_NORM_LAYERS, cfg.SOLVER.NO_DECAY_POSITION_TABLES)
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


def evaluation_tasks(dataset_name: str, mask_on: bool = True, keypoint_on: bool = False) -> tuple[str, ...]:
    """COCO tasks for a dataset: boxes always; masks when the model predicts them and the dataset has
    them (metadata ``has_masks``, set at registration; detectron2's builtin COCO sets have masks);
    keypoints likewise (metadata ``keypoint_names``)."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    tasks = ["bbox"]
    if mask_on and getattr(meta, "has_masks", True):
        tasks.append("segm")
    if keypoint_on and getattr(meta, "keypoint_names", None):
        tasks.append("keypoints")
    return tuple(tasks)


def evaluator_for_dataset(dataset_name: str, output_folder: str, mask_on: bool = True, keypoint_on: bool = False,
                          max_dets_per_image: int = 100):
    """The evaluator that fits the dataset's ``evaluator_type`` metadata (detectron2's convention):
    COCO-format sets (``coco``, also the default for sets registered without a type) get COCO AP on
    :func:`evaluation_tasks`; ``lvis``, ``pascal_voc`` and ``cityscapes_instance`` get their own
    evaluator. Other types raise a DatasetError naming the dataset and its type."""
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    kind = getattr(meta, "evaluator_type", "coco")
    tasks = evaluation_tasks(dataset_name, mask_on, keypoint_on)
    if kind == "coco":
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder, max_dets_per_image=max_dets_per_image,
                             use_fast_impl=_coco_fast_eval_available())
    if kind == "lvis":
        from detectron2.evaluation import LVISEvaluator

        return LVISEvaluator(dataset_name, tasks=tasks, output_dir=output_folder, max_dets_per_image=max_dets_per_image)
    if kind == "pascal_voc":
        from detectron2.evaluation import PascalVOCDetectionEvaluator

        return PascalVOCDetectionEvaluator(dataset_name)
    if kind == "cityscapes_instance":
        from detectron2.evaluation import CityscapesInstanceEvaluator

        return CityscapesInstanceEvaluator(dataset_name)
    raise DatasetError(f"dataset {dataset_name!r} has evaluator_type {kind!r}; an instance detector is evaluated "
                       "here on coco, lvis, pascal_voc or cityscapes_instance sets")


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None):
    """:func:`evaluator_for_dataset` with the settings of a yacs config."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    return evaluator_for_dataset(dataset_name, output_folder, mask_on=cfg.MODEL.MASK_ON,
                                 keypoint_on=cfg.MODEL.KEYPOINT_ON, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)


class _NoTracebackForDataErrors(logging.Filter):
    """detectron2's training loop logs any exception with its traceback before re-raising it. A problem of
    the user's data (DatasetError, e.g. too many unreadable images) is reported once, as `ERROR: ...` by
    train_net.py, so its traceback record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], DatasetError))


logging.getLogger("detectron2.engine.train_loop").addFilter(_NoTracebackForDataErrors())


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the recipe's optimizer, evaluators chosen by dataset type, crash-safe
    checkpoints (:class:`~stm_det.checkpoint.AtomicCheckpointer`), training that skips unreadable
    images (:class:`~stm_det.data.SkipBadImages`), the log period from ``LOG_PERIOD`` and an optional
    ``BestCheckpointer`` (``SOLVER.BEST_CHECKPOINT.METRIC``)."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = build_optimizer(cfg, model)
        for g in optimizer.param_groups:
            logger.info("Optimizer group: %d tensors, weight_decay %g", len(g["params"]), g["weight_decay"])
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg):
        from detectron2.data import DatasetMapper, build_detection_train_loader

        mapper = SkipBadImages(DatasetMapper(cfg, is_train=True), cfg.DATALOADER.MAX_BAD_IMAGES)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    def build_hooks(self):
        """detectron2's default hooks, built here so that each takes its settings through its constructor:
        the checkpointer is an AtomicCheckpointer, the writers run every LOG_PERIOD iterations, and a
        BestCheckpointer follows the evaluation when SOLVER.BEST_CHECKPOINT.METRIC is set."""
        cfg = self.cfg
        # Called at the end of DefaultTrainer.__init__, which has just built a plain DetectionCheckpointer
        # with the same arguments: replace it before any hook holds it.
        self.checkpointer = AtomicCheckpointer(self.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        ret = [hooks.IterationTimer(), hooks.LRScheduler()]
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            precise_cfg = cfg.clone()
            precise_cfg.defrost()
            precise_cfg.DATALOADER.NUM_WORKERS = 0
            ret.append(hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(precise_cfg),
                                       cfg.TEST.PRECISE_BN.NUM_ITER))
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        best = cfg.SOLVER.BEST_CHECKPOINT
        if best.METRIC and comm.is_main_process():
            # After EvalHook, whose results it reads from the event storage; writes model_best.pth.
            ret.append(hooks.BestCheckpointer(cfg.TEST.EVAL_PERIOD, self.checkpointer, best.METRIC, mode=best.MODE))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.LOG_PERIOD))
        return ret

    def resume_or_load(self, resume=True):
        """detectron2's resume (falling back past corrupt checkpoints, see AtomicCheckpointer); when the
        checkpoint resumed from is the last iteration, also make sure that ``model_final.pth`` holds that
        iteration and loads, rewriting it from the loaded state otherwise (a kill while it was written
        leaves the previous or no file, and training would not run again to rewrite it)."""
        super().resume_or_load(resume=resume)
        if resume and self.start_iter >= self.max_iter and comm.is_main_process():
            self.checkpointer.ensure_final(self.iter)
