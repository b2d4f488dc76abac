#!/usr/bin/env python
"""Run a trained detector on your own images: one PNG per image with the predicted boxes, masks, classes
and scores drawn (detectron2's DefaultPredictor + Visualizer), and all detections in a COCO-style json.

    # the CPU demo's model (MODEL.WEIGHTS defaults to OUTPUT_DIR/model_final.pth of the config)
    python apps/detection/demo.py --config-file apps/detection/configs/demo_shapes_unified_convnext_micro.yaml \
        --input my_images/ photo.jpg 'more/*.png' --output demo_out --confidence 0.5
    # any other config and checkpoint
    python apps/detection/demo.py --config-file CFG --input IMAGES... --output DIR MODEL.WEIGHTS path/model_final.pth

Writes DIR/<image name>.png for every image and DIR/predictions.json: ``images`` (id, file_name, height,
width, visualization), ``categories`` (id, name) and ``annotations``, the detections as COCO results
(image_id, category_id, bbox [x, y, w, h], score, segmentation as RLE). Images that cannot be read are
listed on stderr and skipped; the exit status is then 1 (2 for a usage error, 0 when all went well).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def argument_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="opts: detectron2 config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth "
                                       "MODEL.DEVICE cpu")
    p.add_argument("--config-file", required=True, metavar="FILE", help="the yacs config the model was trained with")
    p.add_argument("--input", nargs="+", required=True, metavar="IMAGES",
                   help="image files, folders (their images, not recursive) or glob patterns (quote them)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the PNGs and predictions.json")
    p.add_argument("--confidence", type=float, default=0.5,
                   help="minimum score of a drawn and saved detection (default 0.5)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (KEY VALUE ...)")
    return p


class UsageError(ValueError):
    pass


def expand_inputs(items) -> list[str]:
    """Files, folders (their image files, sorted) and glob patterns (sorted matches), in the order given;
    a path that does not exist is kept, so that it is reported as unreadable."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, n) for n in os.listdir(item)
                            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, n)))
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            if not matches:
                raise UsageError(f"--input {item!r} matches no file")
            paths += matches
        else:
            paths.append(item)
    seen, unique = set(), []
    for p in paths:
        if os.path.abspath(p) not in seen:
            seen.add(os.path.abspath(p))
            unique.append(p)
    return unique


def output_names(paths) -> list[str]:
    """<stem>.png per image, with _2, _3 ... when two images share a stem."""
    used, names = set(), []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "image"
        name, k = f"{stem}.png", 1
        while name in used:
            k += 1
            name = f"{stem}_{k}.png"
        used.add(name)
        names.append(name)
    return names


def setup(args):
    import torch

    from stm_det.config import load_config
    from stm_det.data import register_shapes

    cfg = load_config(args.config_file, args.opts)
    if not 0.0 <= args.confidence <= 1.0:
        raise UsageError(f"--confidence must be in [0, 1], got {args.confidence}")
    register_shapes()  # the demo's class names (metadata only: no file is written)
    if not cfg.MODEL.WEIGHTS:
        default = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if not os.path.isfile(default):
            raise UsageError(f"no weights: MODEL.WEIGHTS is empty and {default} (the config's OUTPUT_DIR) does not "
                             "exist; train first, or pass MODEL.WEIGHTS path/to/model_final.pth")
        cfg.MODEL.WEIGHTS = default
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence
    cfg.freeze()
    return cfg


def build_predictor(cfg):
    """detectron2's DefaultPredictor, with the weights loaded through the app's weights-only loader."""
    from detectron2.engine import DefaultPredictor

    from stm_det.checkpoint import AtomicCheckpointer

    weights = cfg.MODEL.WEIGHTS
    no_weights = cfg.clone()
    no_weights.defrost()
    no_weights.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(no_weights)
    AtomicCheckpointer(predictor.model).load(weights)
    return predictor


def metadata_of(cfg):
    from detectron2.data import MetadataCatalog

    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        meta = MetadataCatalog.get(name)
        if getattr(meta, "thing_classes", None):
            return meta
    return MetadataCatalog.get("__stm_det_demo_unnamed")


def run(args) -> int:
    import numpy as np
    from detectron2.data.detection_utils import read_image
    from detectron2.structures import BoxMode
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image
    from pycocotools import mask as mask_util

    from stm_det.checkpoint import atomic_write_text

    cfg = setup(args)
    paths = expand_inputs(args.input)
    if not paths:
        raise UsageError(f"--input {' '.join(args.input)}: no image found")
    predictor = build_predictor(cfg)
    meta = metadata_of(cfg)
    classes = list(getattr(meta, "thing_classes", []) or [])
    to_dataset_id = {v: k for k, v in getattr(meta, "thing_dataset_id_to_contiguous_id", {}).items()}
    os.makedirs(args.output, exist_ok=True)
    images, annotations, failed = [], [], []
    for image_id, (path, png) in enumerate(zip(paths, output_names(paths)), start=1):
        try:
            bgr = read_image(path, format="BGR")
        except (OSError, SyntaxError, ValueError) as e:  # missing, truncated, not an image
            failed.append((path, f"{type(e).__name__}: {e}"))
            continue
        instances = predictor(bgr)["instances"].to("cpu")
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        drawn = Visualizer(rgb, meta, scale=1.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(instances)
        Image.fromarray(drawn.get_image()).save(os.path.join(args.output, png))
        images.append({"id": image_id, "file_name": path, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                       "visualization": png})
        boxes = BoxMode.convert(instances.pred_boxes.tensor.numpy(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)
        masks = instances.pred_masks.numpy() if instances.has("pred_masks") else None
        for k in range(len(instances)):
            cls = int(instances.pred_classes[k])
            det = {"id": len(annotations) + 1, "image_id": image_id, "category_id": to_dataset_id.get(cls, cls),
                   "category_name": classes[cls] if cls < len(classes) else str(cls),
                   "bbox": [round(float(v), 2) for v in boxes[k]], "score": round(float(instances.scores[k]), 5)}
            if masks is not None:
                rle = mask_util.encode(np.asfortranarray(masks[k].astype(np.uint8)))
                det["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}
                det["area"] = int(masks[k].sum())
            annotations.append(det)
        print(f"{path}: {len(instances)} detection(s) with score >= {args.confidence} -> "
              f"{os.path.join(args.output, png)}")
    categories = [{"id": to_dataset_id.get(i, i), "name": n} for i, n in enumerate(classes)]
    out_json = os.path.join(args.output, "predictions.json")
    atomic_write_text(json.dumps({"images": images, "categories": categories, "annotations": annotations}), out_json)
    print(f"{len(images)} image(s), {len(annotations)} detection(s): {out_json}")
    if failed:
        print(f"Skipped {len(failed)} unreadable image(s):", file=sys.stderr)
        for path, why in failed:
            print(f"  {path}: {why}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = argument_parser().parse_args(argv)
    from stm_det.checkpoint import CheckpointError
    from stm_det.config import ConfigError

    try:
        return run(args)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
