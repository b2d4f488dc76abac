"""Pure-Python stand-in for detectron2's compiled extension ``detectron2._C``.

This module is NOT part of upstream detectron2. It is written for the stm monorepo and is copied
into the detectron2 0.6 source tree by ``third_party/detectron2/build_wheel.py``, because the sdist
we build from ships no C++/CUDA sources.

What it provides:

* COCO evaluation (``InstanceAnnotation``, ``COCOevalEvaluateImages``, ``COCOevalAccumulate``),
  used by ``detectron2.evaluation.fast_eval_api.COCOeval_opt``. They follow pycocotools'
  ``COCOeval.evaluateImg`` / ``COCOeval.accumulate`` step by step (same sort orders, same matching
  rules, same floating point operations), so the resulting stats are identical to pycocotools'.
* Build information for ``detectron2.utils.collect_env`` (``get_compiler_version``,
  ``get_cuda_version``, ``has_cuda``).
* The ops that only exist as C++/CUDA kernels (rotated boxes, rotated ROIAlign, deformable
  convolution) raise ``NotImplementedError`` naming the op. Mask R-CNN with axis-aligned boxes
  does not need them: it uses torchvision's ROIAlign and NMS, and ``DeformConv`` on CPU already
  goes through ``torchvision.ops.deform_conv2d``.
"""

from __future__ import annotations

import datetime

import numpy as np
import torch

# Marker read by build_wheel.py (without importing detectron2) to tell this build from others.
STM_PURE_PYTHON_BUILD = True

_BUILD_NAME = "the CPU/pure-Python stm build of detectron2 (third_party/detectron2 in the stm repo)"


def _unsupported(op: str):
    def _raise(*args, **kwargs):
        raise NotImplementedError(
            f"detectron2._C.{op} is not available: this detectron2 is {_BUILD_NAME}, whose _C is a "
            f"pure-Python replacement without the C++/CUDA kernels. Install a compiled detectron2 "
            f"into the environment first (build_wheel.py then uses it) to get {op}."
        )

    _raise.__name__ = op
    _raise.__qualname__ = op
    _raise.__doc__ = f"Not available in {_BUILD_NAME}: always raises NotImplementedError."
    return _raise


# ---------------------------------------------------------------------------------------------
# Ops that need the C++/CUDA kernels.
# ---------------------------------------------------------------------------------------------
box_iou_rotated = _unsupported("box_iou_rotated")
nms_rotated = _unsupported("nms_rotated")
roi_align_rotated_forward = _unsupported("roi_align_rotated_forward")
roi_align_rotated_backward = _unsupported("roi_align_rotated_backward")
deform_conv_forward = _unsupported("deform_conv_forward")
deform_conv_backward_input = _unsupported("deform_conv_backward_input")
deform_conv_backward_filter = _unsupported("deform_conv_backward_filter")
modulated_deform_conv_forward = _unsupported("modulated_deform_conv_forward")
modulated_deform_conv_backward = _unsupported("modulated_deform_conv_backward")

# The compiled extension also registers some of these as TorchScript ops (detectron2.layers.nms
# calls ``torch.ops.detectron2.nms_rotated``). Register them too, so that such calls raise the same
# NotImplementedError rather than "no such operator". The Library object must stay referenced.
_TORCH_OPS = {
    "nms_rotated": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "box_iou_rotated": "(Tensor boxes1, Tensor boxes2) -> Tensor",
    "roi_align_rotated_forward": "(Tensor input, Tensor rois, float spatial_scale, "
    "int pooled_height, int pooled_width, int sampling_ratio) -> Tensor",
    "roi_align_rotated_backward": "(Tensor grad, Tensor rois, float spatial_scale, "
    "int pooled_height, int pooled_width, int batch_size, int channels, int height, int width, "
    "int sampling_ratio) -> Tensor",
}
_torch_library = None
try:
    _torch_library = torch.library.Library("detectron2", "FRAGMENT")
    for _name, _schema in _TORCH_OPS.items():
        if hasattr(torch.ops.detectron2, _name):  # already registered (module reloaded)
            continue
        _torch_library.define(_name + _schema)
        _torch_library.impl(_name, globals()[_name], "CompositeExplicitAutograd")
except Exception:  # pragma: no cover - registration is a convenience, never fatal
    pass


# ---------------------------------------------------------------------------------------------
# Build information (detectron2.utils.collect_env).
# ---------------------------------------------------------------------------------------------
def get_compiler_version() -> str:
    return "none: pure-Python detectron2._C (stm build)"


def get_cuda_version() -> str:
    return "none: pure-Python detectron2._C (stm build), no CUDA kernels"


def has_cuda() -> bool:
    return False


# ---------------------------------------------------------------------------------------------
# COCO evaluation (detectron2.evaluation.fast_eval_api.COCOeval_opt).
# ---------------------------------------------------------------------------------------------
class InstanceAnnotation:
    """One ground-truth or detected instance, as the C++ struct of the same name."""

    __slots__ = ("id", "score", "area", "is_crowd", "ignore")

    def __init__(self, id: int, score: float, area: float, is_crowd: bool, ignore: bool):
        self.id = int(id)
        self.score = float(score)
        self.area = float(area)
        self.is_crowd = bool(is_crowd)
        self.ignore = bool(ignore)

    def __repr__(self) -> str:
        return (
            f"InstanceAnnotation(id={self.id}, score={self.score}, area={self.area}, "
            f"is_crowd={self.is_crowd}, ignore={self.ignore})"
        )


def _evaluate_image(area_range, max_detections, iou_thresholds, ious, gts, dts):
    """pycocotools ``COCOeval.evaluateImg`` for one (image, category, area range).

    ``ious`` is the [num_dt, num_gt] matrix of ``COCOeval.computeIoU`` (rows: detections sorted by
    decreasing score, truncated to max_detections) or an empty list.
    """
    if len(gts) == 0 and len(dts) == 0:
        return None
    lo, hi = area_range[0], area_range[1]

    gt_ignore_flags = [1 if (g.ignore or g.area < lo or g.area > hi) else 0 for g in gts]
    # ground truth: ignored ones last; detections: highest score first (both stable sorts)
    gt_order = np.argsort(gt_ignore_flags, kind="mergesort")
    gts = [gts[i] for i in gt_order]
    dt_order = np.argsort([-d.score for d in dts], kind="mergesort")
    dts = [dts[i] for i in dt_order[0:max_detections]]
    iscrowd = [int(g.is_crowd) for g in gts]
    if len(ious) > 0:
        ious = np.asarray(ious)[:, gt_order]

    num_thresholds = len(iou_thresholds)
    num_gt, num_dt = len(gts), len(dts)
    gt_matches = np.zeros((num_thresholds, num_gt))
    dt_matches = np.zeros((num_thresholds, num_dt))
    gt_ignore = np.array([gt_ignore_flags[i] for i in gt_order])
    dt_ignore = np.zeros((num_thresholds, num_dt))
    if not len(ious) == 0:
        for t_idx, threshold in enumerate(iou_thresholds):
            for d_idx, det in enumerate(dts):
                best_iou = min([threshold, 1 - 1e-10])
                match = -1
                for g_idx in range(num_gt):
                    # a ground truth can be matched once, unless it is a crowd region
                    if gt_matches[t_idx, g_idx] > 0 and not iscrowd[g_idx]:
                        continue
                    # already matched to a regular ground truth: ignored ones cannot do better
                    if match > -1 and gt_ignore[match] == 0 and gt_ignore[g_idx] == 1:
                        break
                    if ious[d_idx, g_idx] < best_iou:
                        continue
                    best_iou = ious[d_idx, g_idx]
                    match = g_idx
                if match == -1:
                    continue
                dt_ignore[t_idx, d_idx] = gt_ignore[match]
                dt_matches[t_idx, d_idx] = gts[match].id
                gt_matches[t_idx, match] = det.id
    # unmatched detections outside the area range are ignored
    outside = np.array([d.area < lo or d.area > hi for d in dts]).reshape((1, num_dt))
    dt_ignore = np.logical_or(
        dt_ignore, np.logical_and(dt_matches == 0, np.repeat(outside, num_thresholds, 0))
    )
    return {
        "dtIds": [d.id for d in dts],
        "gtIds": [g.id for g in gts],
        "dtMatches": dt_matches,
        "gtMatches": gt_matches,
        "dtScores": [d.score for d in dts],
        "gtIgnore": gt_ignore,
        "dtIgnore": dt_ignore,
    }


def COCOevalEvaluateImages(
    area_ranges,
    max_detections,
    iou_thresholds,
    image_category_ious,
    image_category_ground_truth_instances,
    image_category_detection_instances,
):
    """Evaluate every (category, area range, image); same layout as pycocotools' ``evalImgs``.

    The inputs are indexed ``[image][category]``; the result is a flat list indexed
    ``category * num_area_ranges * num_images + area_range * num_images + image`` whose entries
    are None (no ground truth and no detection) or dicts with pycocotools' evalImgs fields.
    """
    num_images = len(image_category_ground_truth_instances)
    num_categories = len(image_category_ious[0]) if len(image_category_ious) > 0 else 0
    num_area_ranges = len(area_ranges)
    iou_thresholds = [float(t) for t in iou_thresholds]
    results = [None] * (num_categories * num_area_ranges * num_images)
    for i in range(num_images):
        for c in range(num_categories):
            gts = list(image_category_ground_truth_instances[i][c])
            dts = list(image_category_detection_instances[i][c])
            ious = image_category_ious[i][c]
            for a, area_range in enumerate(area_ranges):
                results[c * num_area_ranges * num_images + a * num_images + i] = _evaluate_image(
                    area_range, max_detections, iou_thresholds, ious, gts, dts
                )
    return results


def COCOevalAccumulate(params, evaluations):
    """pycocotools ``COCOeval.accumulate`` over the output of :func:`COCOevalEvaluateImages`.

    ``params`` are the parameters the evaluation ran with (``COCOeval_opt._paramsEval``); it is
    not modified. Returns the ``COCOeval.eval`` dict (params, counts, date, precision, recall,
    scores); precision/scores have shape counts = [T, R, K, A, M], recall [T, K, A, M].
    """
    cat_ids = list(params.catIds) if params.useCats == 1 else [-1]
    rec_thrs = params.recThrs
    num_t = len(params.iouThrs)
    num_r = len(rec_thrs)
    num_k = len(cat_ids) if params.useCats else 1
    num_a = len(params.areaRng)
    num_m = len(params.maxDets)
    num_i = len(params.imgIds)
    precision = -np.ones((num_t, num_r, num_k, num_a, num_m))  # -1: no ground truth
    recall = -np.ones((num_t, num_k, num_a, num_m))
    scores = -np.ones((num_t, num_r, num_k, num_a, num_m))

    for k in range(num_k):
        offset_k = k * num_a * num_i
        for a in range(num_a):
            offset_a = a * num_i
            for m, max_det in enumerate(params.maxDets):
                per_image = [evaluations[offset_k + offset_a + i] for i in range(num_i)]
                per_image = [e for e in per_image if e is not None]
                if len(per_image) == 0:
                    continue
                dt_scores = np.concatenate([e["dtScores"][0:max_det] for e in per_image])
                order = np.argsort(-dt_scores, kind="mergesort")
                dt_scores_sorted = dt_scores[order]
                dtm = np.concatenate([e["dtMatches"][:, 0:max_det] for e in per_image], axis=1)
                dtm = dtm[:, order]
                dt_ig = np.concatenate([e["dtIgnore"][:, 0:max_det] for e in per_image], axis=1)
                dt_ig = dt_ig[:, order]
                gt_ig = np.concatenate([e["gtIgnore"] for e in per_image])
                num_valid_gt = np.count_nonzero(gt_ig == 0)
                if num_valid_gt == 0:
                    continue
                tps = np.logical_and(dtm, np.logical_not(dt_ig))
                fps = np.logical_and(np.logical_not(dtm), np.logical_not(dt_ig))
                tp_sum = np.cumsum(tps, axis=1).astype(dtype=float)
                fp_sum = np.cumsum(fps, axis=1).astype(dtype=float)
                for t, (tp, fp) in enumerate(zip(tp_sum, fp_sum)):
                    tp = np.array(tp)
                    fp = np.array(fp)
                    nd = len(tp)
                    rc = tp / num_valid_gt
                    pr = tp / (fp + tp + np.spacing(1))
                    q = np.zeros((num_r,)).tolist()
                    ss = np.zeros((num_r,))
                    recall[t, k, a, m] = rc[-1] if nd else 0
                    # precision envelope: make it non-increasing from the right
                    pr = pr.tolist()
                    for i in range(nd - 1, 0, -1):
                        if pr[i] > pr[i - 1]:
                            pr[i - 1] = pr[i]
                    inds = np.searchsorted(rc, rec_thrs, side="left")
                    # recall thresholds beyond the reached recall keep precision 0
                    for ri, pi in enumerate(inds):
                        if pi >= nd:
                            break
                        q[ri] = pr[pi]
                        ss[ri] = dt_scores_sorted[pi]
                    precision[t, :, k, a, m] = np.array(q)
                    scores[t, :, k, a, m] = np.array(ss)

    return {
        "params": params,
        "counts": [num_t, num_r, num_k, num_a, num_m],
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "precision": precision,
        "recall": recall,
        "scores": scores,
    }
