#!/usr/bin/env python
"""Train / evaluate Mask R-CNN + FPN with a unified backbone (detectron2's DefaultTrainer).

    python apps/detection/train_net.py --config-file apps/detection/configs/demo_shapes_unified_convnext_micro.yaml
    python apps/detection/train_net.py --config-file apps/detection/configs/mask_rcnn_unified_swin_tiny_fpn_1x_coco.yaml \
        --num-gpus 8 MODEL.UNIFIED.PRETRAINED /path/to/unified_swin_tiny.pth
    python apps/detection/train_net.py --config-file ... --resume                 # continue from OUTPUT_DIR/last_checkpoint
    python apps/detection/train_net.py --config-file ... --eval-only MODEL.WEIGHTS OUTPUT_DIR/model_final.pth
    python apps/detection/train_net.py --config-file ... --register-coco mine_train ann/train.json img/train \
        --register-coco mine_val ann/val.json img/val DATASETS.TRAIN '("mine_train",)' DATASETS.TEST '("mine_val",)'
    python apps/detection/train_net.py --config-file apps/detection/configs/lazy/mask_rcnn_unified_convnext_micro_fpn_1x_coco.py \
        train.max_iter=1000                                                      # a LazyConfig, key=value overrides

Checkpoints are written atomically and --resume falls back past a damaged one (stm_det.checkpoint). User
mistakes (missing config file, unknown key or model name, bad dataset, nothing to resume from) end with
`ERROR: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import detectron2.utils.comm as comm  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from stm_det.checkpoint import AtomicCheckpointer, CheckpointError, atomic_write_text  # noqa: E402
from stm_det.config import ConfigError, load_config  # noqa: E402  (importing stm_det registers the backbones)
from stm_det.data import DatasetError, check_num_classes, prepare_datasets  # noqa: E402
from stm_det.trainer import Trainer  # noqa: E402
from stm_det.visualize import visualize_predictions  # noqa: E402

logger = logging.getLogger("stm_det")


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
        help="register a COCO-format instances set under NAME (repeatable); DATASETS.TRAIN/TEST can then name it. "
             "The json and images are checked before training starts.")
    return parser


UsageError = ConfigError  # a mistake in the command line or the config: `ERROR: ...`, exit status 2


def check_config_file(path: str) -> None:
    if not path:
        raise UsageError("--config-file is required (e.g. apps/detection/configs/demo_shapes_unified_convnext_micro.yaml)")
    if not os.path.isfile(path):
        raise UsageError(f"--config-file {path}: file not found")


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    # Training needs DATASETS.TRAIN and TEST; evaluation only TEST.
    used = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    registered = prepare_datasets(cfg, args.register_coco, used)
    # The number of classes comes from the user's own json when every dataset that defines the classes
    # (TRAIN, or TEST with --eval-only) was registered with --register-coco, unless it is given on the
    # command line.
    class_sets = list(cfg.DATASETS.TEST) if args.eval_only else list(cfg.DATASETS.TRAIN)
    counts = {registered[n] for n in class_sets if n in registered}
    set_on_cmdline = "MODEL.ROI_HEADS.NUM_CLASSES" in (args.opts or [])[::2]
    if not set_on_cmdline and class_sets and all(n in registered for n in class_sets) and len(counts) == 1:
        num_classes = counts.pop()
        if num_classes != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            print(f"[stm_det] MODEL.ROI_HEADS.NUM_CLASSES {cfg.MODEL.ROI_HEADS.NUM_CLASSES} -> {num_classes} "
                  f"(the categories of {', '.join(class_sets)})")
            cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    check_num_classes(cfg, class_sets)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        print("[stm_det] CUDA is not available: MODEL.DEVICE cuda -> cpu")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    # The app's own warnings (skipped images, checkpoint fallbacks) in the console and OUTPUT_DIR/log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="stm_det", abbrev_name="stm_det")
    return cfg


def visualize(cfg, model):
    if cfg.TEST.VIS_IMAGES <= 0 or not comm.is_main_process():
        return
    model = model.module if hasattr(model, "module") else model
    for name in cfg.DATASETS.TEST:
        visualize_predictions(cfg, model, name, cfg.TEST.VIS_IMAGES,
                              os.path.join(cfg.OUTPUT_DIR, f"predictions_{name}.png"), cfg.TEST.VIS_SCORE_THRESH)


def run(args):
    if args.config_file.endswith(".py"):
        from stm_det import lazy

        return lazy.main(args)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            atomic_write_text(json.dumps(res, indent=2), os.path.join(cfg.OUTPUT_DIR, "eval_results.json"))
        visualize(cfg, model)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    res = trainer.train()
    visualize(cfg, trainer.model)
    return res


def main(args):
    """One process's work; user mistakes (bad config, dataset, checkpoint) end it with `ERROR: ...`
    on stderr and exit status 2, without a traceback."""
    try:
        return run(args)
    except (UsageError, DatasetError, CheckpointError) as e:
        message = str(e)
        marker = f"{type(e).__name__}: "  # the traceback's last lines: "stm_det.data.TooManyBadImages: ..."
        if "Original Traceback" in message and marker in message:  # re-raised from a data-loader worker
            message = message[message.rindex(marker) + len(marker):]
        print(f"ERROR: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    args = argument_parser().parse_args()
    try:
        check_config_file(args.config_file)
    except UsageError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
