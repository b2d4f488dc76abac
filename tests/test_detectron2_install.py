"""detectron2, as installed by third_party/detectron2/build_wheel.py, imports and works on the CPU.

The environment gets detectron2 from `nox -s test` (or `python third_party/detectron2/build_wheel.py
--install`): our patched, pure-Python build of v0.6 whose `detectron2._C` is the stand-in in
third_party/detectron2/overlay/, unless a compiled detectron2 was installed beforehand.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OVERLAY_C = ROOT / "third_party" / "detectron2" / "overlay" / "detectron2" / "_C.py"
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
UNSUPPORTED_OPS = [
    "nms_rotated",
    "box_iou_rotated",
    "roi_align_rotated_forward",
    "roi_align_rotated_backward",
    "deform_conv_forward",
    "deform_conv_backward_input",
    "deform_conv_backward_filter",
    "modulated_deform_conv_forward",
    "modulated_deform_conv_backward",
]

try:
    import detectron2
except ImportError as error:  # reported by the `d2` fixture, in every test that needs detectron2
    detectron2 = None
    _IMPORT_ERROR = repr(error)


@pytest.fixture(scope="module")
def d2():
    if detectron2 is None:
        pytest.fail(
            f"detectron2 is not installed in this environment ({_IMPORT_ERROR}). Run `nox -s test`, which "
            "installs it (or `python third_party/detectron2/build_wheel.py --install` with this environment's "
            "python).",
            pytrace=False,
        )
    return detectron2


@pytest.fixture(scope="module")
def is_stm_build(d2) -> bool:
    """True when the installed detectron2 is our pure-Python build (not a compiled one)."""
    import detectron2._C as C

    return bool(getattr(C, "STM_PURE_PYTHON_BUILD", False))


@pytest.fixture(scope="module")
def overlay_c():
    """Our _C stand-in, loaded from the source tree (whatever detectron2 is installed)."""
    spec = importlib.util.spec_from_file_location("stm_detectron2_c_overlay", OVERLAY_C)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------
# Installation
# ------------------------------------------------------------------------------------------------
def test_imports(d2):
    import detectron2._C  # noqa: F401
    import detectron2.evaluation.fast_eval_api  # noqa: F401
    import detectron2.layers
    import detectron2.modeling  # noqa: F401
    from detectron2.utils.collect_env import collect_env_info

    assert hasattr(detectron2.layers, "ROIAlign") and hasattr(detectron2.layers, "batched_nms")
    assert "detectron2" in collect_env_info()


def test_installed_build_is_ours_or_compiled(d2, is_stm_build):
    import detectron2._C as C

    origin = Path(C.__file__)
    if is_stm_build:
        assert origin.suffix == ".py"
        assert origin.read_bytes() == OVERLAY_C.read_bytes(), (
            f"the installed {origin} differs from {OVERLAY_C}: the environment is stale, rerun "
            "`python third_party/detectron2/build_wheel.py --install` (nox -s test does it)"
        )
    else:
        assert origin.suffix in (".so", ".pyd"), f"detectron2._C at {origin} is neither ours nor compiled"


def test_model_zoo_config(d2):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    path = Path(model_zoo.get_config_file(MASK_RCNN_CONFIG))
    assert path.is_file() and path.name == "mask_rcnn_R_50_FPN_1x.yaml"
    assert (path.parent.parent / "Base-RCNN-FPN.yaml").is_file()  # its _BASE_
    assert Path(model_zoo.get_config_file("common/models/mask_rcnn_fpn.py")).is_file()  # LazyConfig files
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.MASK_ON and cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    with pytest.raises(RuntimeError, match="not available in Model Zoo"):
        model_zoo.get_config_file("no/such/config.yaml")


# ------------------------------------------------------------------------------------------------
# The _C stand-in: ops it does not have raise NotImplementedError naming the op
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", UNSUPPORTED_OPS)
def test_overlay_unsupported_ops_raise(overlay_c, op):
    with pytest.raises(NotImplementedError, match=rf"detectron2\._C\.{op}\b.*pure-Python"):
        getattr(overlay_c, op)(torch.zeros(1, 5), torch.zeros(1, 5))


def test_installed_unsupported_ops_raise(d2, is_stm_build):
    if not is_stm_build:
        pytest.skip("a compiled detectron2 is installed: it has the real rotated/deformable ops")
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 6.0, 30.0], [11.0, 10.0, 4.0, 6.0, 0.0]])
    with pytest.raises(NotImplementedError, match=r"nms_rotated.*stm build"):
        nms_rotated(boxes, torch.tensor([0.9, 0.8]), 0.5)  # via torch.ops.detectron2.nms_rotated
    with pytest.raises(NotImplementedError, match=r"nms_rotated"):
        _C.nms_rotated(boxes, torch.tensor([0.9, 0.8]), 0.5)
    with pytest.raises(NotImplementedError, match=r"box_iou_rotated"):
        pairwise_iou_rotated(boxes, boxes)
    assert "stm build" in _C.get_compiler_version() and _C.has_cuda() is False


# ------------------------------------------------------------------------------------------------
# Mask R-CNN R50-FPN on the CPU
# ------------------------------------------------------------------------------------------------
def test_mask_rcnn_forward_cpu(d2):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    torch.manual_seed(0)
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN_CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    model = build_model(cfg).eval()
    assert not model.training and next(model.parameters()).device.type == "cpu"
    height, width = 96, 128
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8).float()
    inputs = [{"image": image, "height": height, "width": width}]
    with torch.no_grad():
        (output,) = model(inputs)
    # Full pipeline: backbone, FPN, RPN (+NMS), box head. Random weights give saturated scores
    # and often degenerate boxes, so the number of detections is not checked here.
    instances = output["instances"]
    assert instances.image_size == (height, width) and len(instances) <= 5
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        assert instances.has(field), field
    assert torch.isfinite(instances.pred_boxes.tensor).all() and torch.isfinite(instances.scores).all()

    # Mask head on given boxes: ROIAlign (torchvision) and mask pasting, whatever the box head says.
    given = Instances((height, width))
    given.pred_boxes = Boxes(torch.tensor([[4.0, 6.0, 60.0, 70.0], [30.0, 20.0, 120.0, 90.0]]))
    given.pred_classes = torch.tensor([0, 2])
    given.scores = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        (output,) = model.inference(inputs, detected_instances=[given])
    masks = output["instances"].pred_masks
    assert masks.shape == (2, height, width) and masks.dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# COCO evaluation: detectron2's COCOeval_opt gives exactly pycocotools' numbers
# ------------------------------------------------------------------------------------------------
def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box_mask(height: int, width: int, box, cut: float) -> np.ndarray:
    """A box with its top-left corner cut off, so that masks and boxes give different IoUs."""
    x, y, w, h = box
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))
    mask[y0:y1, x0:x1] = True
    cx, cy = int(x + cut * w), int(y + cut * h)
    mask[y0:cy, x0:cx] = False
    return mask


def _synthetic_coco(seed: int = 0):
    """A small COCO ground truth (3 categories, small/medium/large objects, crowd regions, one empty
    image) and noisy detections with tied scores, duplicates, false positives and misses."""
    rng = np.random.RandomState(seed)
    height, width = 200, 240
    images, annotations, detections = [], [], []
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 5, "name": "c"}]
    ann_id = 1
    for image_id in range(1, 9):
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.png"})
        num_gt = 0 if image_id == 3 else rng.randint(1, 7)
        for _ in range(num_gt):
            size = rng.choice([20.0, 55.0, 140.0]) * rng.uniform(0.7, 1.25)
            w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3)
            w, h = min(w, width - 2.0), min(h, height - 2.0)
            x, y = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
            category = int(rng.choice([1, 1, 2, 5]))
            mask = _box_mask(height, width, (x, y, w, h), cut=0.3)
            annotations.append({
                "id": ann_id, "image_id": image_id, "category_id": category, "bbox": [x, y, w, h],
                "area": float(mask.sum()), "iscrowd": int(rng.rand() < 0.12), "segmentation": _rle(mask),
            })
            ann_id += 1
            for _copy in range(rng.choice([0, 1, 1, 1, 2])):  # missed, found, found twice
                jitter = rng.normal(0, 0.12 * size, 4)
                box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 4.0), max(h + jitter[3], 4.0)]
                box[0], box[1] = float(np.clip(box[0], 0, width - 5)), float(np.clip(box[1], 0, height - 5))
                box[2], box[3] = min(box[2], width - box[0]), min(box[3], height - box[1])
                wrong_class = rng.rand() < 0.1
                detections.append({
                    "image_id": image_id,
                    "category_id": int(rng.choice([1, 2, 5])) if wrong_class else category,
                    "bbox": [float(v) for v in box],
                    "score": float(np.round(rng.uniform(0.05, 1.0), 1)),  # rounded: many ties
                    "segmentation": _rle(_box_mask(height, width, box, cut=rng.uniform(0.0, 0.5))),
                })
        for _ in range(rng.randint(0, 4)):  # false positives
            w, h = rng.uniform(8, 120, 2)
            x, y = rng.uniform(0, width - w - 1), rng.uniform(0, height - h - 1)
            detections.append({
                "image_id": image_id, "category_id": int(rng.choice([1, 2, 5])),
                "bbox": [float(x), float(y), float(w), float(h)],
                "score": float(np.round(rng.uniform(0.05, 1.0), 1)),
                "segmentation": _rle(_box_mask(height, width, (x, y, w, h), cut=0.2)),
            })
    # Hand-made corner cases (image 9): a detection with exactly equal IoU (0.6) to two ground
    # truths (pycocotools keeps the later one, so the next detection finds it taken), and objects
    # whose areas lie exactly on the small/medium/large boundaries (32**2 and 96**2).
    image_id = 9
    images.append({"id": image_id, "height": height, "width": width, "file_name": "9.png"})

    def box_instance(box, **fields):
        mask = _box_mask(height, width, box, cut=0.0)
        return {"image_id": image_id, "bbox": [float(v) for v in box], "segmentation": _rle(mask), **fields}

    for box, category in (((0, 0, 40, 40), 1), ((20, 0, 40, 40), 1), ((100, 100, 32, 32), 2), ((130, 100, 96, 96), 5)):
        annotations.append(box_instance(box, id=ann_id, category_id=category, area=float(box[2] * box[3]), iscrowd=0))
        ann_id += 1
    for box, category, score in (
        ((10, 0, 40, 40), 1, 0.9), ((30, 0, 40, 40), 1, 0.8),  # IoU 0.6 with both / 0.6 with the second
        ((100, 100, 32, 32), 2, 0.7), ((150, 10, 32, 32), 2, 0.6), ((131, 101, 96, 96), 5, 0.5),
    ):
        detections.append(box_instance(box, category_id=category, score=score))
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    return dataset, detections


def _evaluate(cls, dataset, detections, iou_type, use_cats=1, max_dets=None):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dataset)
        coco_gt.createIndex()
        results = copy.deepcopy(detections)
        for result in results:  # as detectron2 does: bbox AP from boxes, mask AP from masks
            result.pop("segmentation" if iou_type == "bbox" else "bbox")
        evaluator = cls(coco_gt, coco_gt.loadRes(results), iou_type)
        evaluator.params.useCats = use_cats
        if max_dets is not None:
            evaluator.params.maxDets = max_dets
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


@pytest.fixture(scope="module")
def synthetic_coco():
    return _synthetic_coco()


def _assert_same_evaluation(fast, reference):
    assert np.array_equal(fast.stats, reference.stats), (fast.stats, reference.stats)
    for key in ("precision", "recall", "scores"):
        assert fast.eval[key].shape == reference.eval[key].shape
        assert np.array_equal(fast.eval[key], reference.eval[key]), key
    assert fast.eval["counts"] == reference.eval["counts"]
    # the data must exercise the evaluation: real APs, not only the -1 of absent categories
    assert 0.0 < reference.stats[0] < 1.0 and 0.0 < reference.stats[1] < 1.0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("use_cats", [1, 0])
def test_overlay_coco_eval_matches_pycocotools(d2, overlay_c, monkeypatch, synthetic_coco, iou_type, use_cats):
    """Our COCOevalEvaluateImages/COCOevalAccumulate (loaded from the source tree) behind COCOeval_opt."""
    from detectron2.evaluation import fast_eval_api
    from pycocotools.cocoeval import COCOeval

    monkeypatch.setattr(fast_eval_api, "_C", overlay_c)
    dataset, detections = synthetic_coco
    reference = _evaluate(COCOeval, dataset, detections, iou_type, use_cats)
    fast = _evaluate(fast_eval_api.COCOeval_opt, dataset, detections, iou_type, use_cats)
    _assert_same_evaluation(fast, reference)
    # a maxDets setting that truncates detections (1 and 3 per image)
    reference = _evaluate(COCOeval, dataset, detections, iou_type, use_cats, max_dets=[1, 3, 100])
    fast = _evaluate(fast_eval_api.COCOeval_opt, dataset, detections, iou_type, use_cats, max_dets=[1, 3, 100])
    _assert_same_evaluation(fast, reference)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_installed_coco_eval_opt_matches_pycocotools(d2, is_stm_build, synthetic_coco, iou_type):
    """The installed detectron2's COCOeval_opt, whatever its _C (exact for ours)."""
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
    from pycocotools.cocoeval import COCOeval

    dataset, detections = synthetic_coco
    reference = _evaluate(COCOeval, dataset, detections, iou_type)
    fast = _evaluate(COCOeval_opt, dataset, detections, iou_type)
    if is_stm_build:
        _assert_same_evaluation(fast, reference)
    else:  # detectron2's C++ version: equal up to rounding (detectron2's own test uses 1e-4)
        np.testing.assert_allclose(fast.stats, reference.stats, atol=1e-4)


def test_coco_evaluator_fast_equals_pycocotools(d2, is_stm_build, tmp_path, synthetic_coco):
    """detectron2's COCOEvaluator on model-style outputs: use_fast_impl=True gives the numbers of
    use_fast_impl=False (pycocotools' COCOeval), for boxes and masks."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances
    from pycocotools import mask as mask_util

    dataset, detections = synthetic_coco
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(dataset))
    name = f"stm_synthetic_coco_{id(tmp_path)}"
    category_ids = [c["id"] for c in dataset["categories"]]
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        thing_classes=[c["name"] for c in dataset["categories"]],
        thing_dataset_id_to_contiguous_id={cid: i for i, cid in enumerate(category_ids)},
    )
    inputs, outputs = [], []
    for image in dataset["images"]:
        mine = [d for d in detections if d["image_id"] == image["id"]]
        instances = Instances((image["height"], image["width"]))
        boxes = torch.tensor([d["bbox"] for d in mine], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        instances.pred_boxes = Boxes(boxes)
        instances.scores = torch.tensor([d["score"] for d in mine], dtype=torch.float32)
        instances.pred_classes = torch.tensor([category_ids.index(d["category_id"]) for d in mine], dtype=torch.int64)
        masks = [mask_util.decode(d["segmentation"]).astype(bool) for d in mine]
        instances.pred_masks = torch.from_numpy(
            np.stack(masks) if masks else np.zeros((0, image["height"], image["width"]), dtype=bool)
        )
        inputs.append({"image_id": image["id"]})
        outputs.append({"instances": instances})

    results = {}
    for use_fast_impl in (True, False):
        evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, use_fast_impl=use_fast_impl)
        evaluator.reset()
        evaluator.process(inputs, outputs)
        results[use_fast_impl] = evaluator.evaluate()
    assert set(results[True]) == {"bbox", "segm"}
    assert 0.0 < results[False]["bbox"]["AP"] < 100.0 and 0.0 < results[False]["segm"]["AP"] < 100.0
    if is_stm_build:
        np.testing.assert_equal(results[True], results[False])
    else:  # detectron2's C++ version: equal up to rounding (APs are in percent here)
        for task, metrics in results[False].items():
            for key, value in metrics.items():
                np.testing.assert_allclose(results[True][task][key], value, atol=1e-2, err_msg=f"{task}/{key}")
