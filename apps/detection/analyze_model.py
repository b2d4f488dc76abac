#!/usr/bin/env python
"""FLOPs and parameters of a detector built from a config (detectron2's FlopCountAnalysis / fvcore).

    python apps/detection/analyze_model.py --config-file apps/detection/configs/mask_rcnn_unified_swin_tiny_fpn_1x_coco.yaml \
        --tasks flop parameter --num-inputs 5 MODEL.DEVICE cpu

``flop`` runs the model in inference mode on the first --num-inputs images of DATASETS.TEST (the test-time
resize of the config) and counts one fused multiply-add as one FLOP, as fvcore and detectron2 do; the
count depends on the image size and, for the heads, on the number of proposals and detections (random
weights unless MODEL.WEIGHTS is given). ``parameter`` counts the parameters per module. With --output DIR
the figures also go to DIR/analysis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TASKS = ("flop", "parameter")


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--num-inputs", type=int, default=5, help="images of DATASETS.TEST to count FLOPs on (default 5)")
    p.add_argument("--max-depth", type=int, default=3, help="module depth of the printed tables (default 3)")
    p.add_argument("--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGE_ROOT"),
                   help="register a COCO-format set that DATASETS.TEST names (as in train_net.py)")
    p.add_argument("--output", metavar="DIR", help="also write DIR/analysis.json")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return p


def flop_analysis(cfg, model, num_inputs: int, max_depth: int) -> dict:
    import numpy as np
    import torch
    from detectron2.data import build_detection_test_loader
    from detectron2.utils.analysis import FlopCountAnalysis
    from fvcore.nn import flop_count_table

    from stm_det.data import DatasetError

    if not cfg.DATASETS.TEST:
        raise DatasetError("the flop task runs the model on images of DATASETS.TEST, which is empty")
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    per_image, table = [], None
    model.eval()
    with torch.no_grad():
        for idx, inputs in zip(range(num_inputs), loader):
            flops = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            by_module = flops.by_module()
            height, width = inputs[0]["image"].shape[-2:]
            per_image.append({
                "file_name": inputs[0]["file_name"], "input_size": [int(height), int(width)],
                # detectron2 traces the model inside a TracingAdapter, whose attribute is "model".
                "flops": int(flops.total()), "backbone_flops": int(by_module.get("model.backbone", 0)),
                "backbone.bottom_up_flops": int(by_module.get("model.backbone.bottom_up", 0)),
            })
            if idx == 0:
                table = flop_count_table(flops, max_depth=max_depth)
    if not per_image:
        raise DatasetError(f"dataset {cfg.DATASETS.TEST[0]!r} has no image to count FLOPs on")
    totals = [r["flops"] for r in per_image]
    print(f"FLOPs of the first image ({per_image[0]['file_name']}, {per_image[0]['input_size'][0]} x "
          f"{per_image[0]['input_size'][1]} after the test resize) per module:\n{table}")
    mean, std = float(np.mean(totals)) / 1e9, float(np.std(totals)) / 1e9
    print(f"Average GFLOPs per image over {len(totals)} image(s): {mean:.4f} +- {std:.4f} "
          f"(backbone trunk {np.mean([r['backbone.bottom_up_flops'] for r in per_image]) / 1e9:.4f})")
    return {"gflops_mean": mean, "gflops_std": std, "images": per_image}


def parameter_analysis(model, max_depth: int) -> dict:
    from fvcore.nn import parameter_count, parameter_count_table

    counts = parameter_count(model)
    print(f"Parameters per module:\n{parameter_count_table(model, max_depth=max_depth)}")
    print(f"Total parameters: {counts['']} ({counts[''] / 1e6:.2f} M); backbone trunk "
          f"{counts.get('backbone.bottom_up', 0) / 1e6:.2f} M")
    return {"total": int(counts[""]), "by_module": {k: int(v) for k, v in counts.items() if k.count(".") < max_depth}}


def run(args) -> int:
    import torch
    from detectron2.modeling import build_model

    from stm_det.checkpoint import AtomicCheckpointer, atomic_write_text
    from stm_det.config import load_config
    from stm_det.data import prepare_datasets

    if args.num_inputs < 1:
        from stm_det.config import ConfigError

        raise ConfigError(f"--num-inputs must be at least 1, got {args.num_inputs}")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if "flop" in args.tasks:
        prepare_datasets(cfg, args.register_coco, list(cfg.DATASETS.TEST))
    cfg.freeze()
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    result = {"config_file": args.config_file}
    if "parameter" in args.tasks:
        result["parameters"] = parameter_analysis(model, args.max_depth)
    if "flop" in args.tasks:
        result["flops"] = flop_analysis(cfg, model, args.num_inputs, args.max_depth)
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        atomic_write_text(json.dumps(result, indent=2), os.path.join(args.output, "analysis.json"))
    return 0


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    from stm_det.checkpoint import CheckpointError
    from stm_det.config import ConfigError
    from stm_det.data import DatasetError

    try:
        return run(args)
    except (ConfigError, DatasetError, CheckpointError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
