"""End to end on the generated shapes: train a few iterations (checkpoints, metrics.json, TensorBoard
events, COCO evaluation, predictions PNG), --resume from the last checkpoint, --eval-only, and
--register-coco of a COCO-format set by name."""

from __future__ import annotations

import json
import os

import pytest
from det_test_utils import DEMO_CONFIG, SMALL_OVERRIDES, run_train_net

pytestmark = pytest.mark.slow

TINY = [
    *SMALL_OVERRIDES,
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.0005", "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "LOG_PERIOD", "1",
    "DATALOADER.NUM_WORKERS", "0", "TEST.VIS_IMAGES", "2", "TEST.VIS_SCORE_THRESH", "0.0",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still predicts something
]


def _metrics(out):
    with open(out / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes_root):
    """4 iterations on stm_shapes_train (evaluated on a 10-image slice of the val json)."""
    tmp = tmp_path_factory.mktemp("det_e2e")
    with open(os.path.join(shapes_root, "val.json")) as f:
        val = json.load(f)
    keep = {im["id"] for im in val["images"][:10]}
    val["images"] = [im for im in val["images"] if im["id"] in keep]
    val["annotations"] = [a for a in val["annotations"] if a["image_id"] in keep]
    small_val = tmp / "val10.json"
    small_val.write_text(json.dumps(val))
    out = tmp / "out"
    register = ["--register-coco", "shapes_val10", small_val, shapes_root]
    args = ["--config-file", DEMO_CONFIG, *register, *TINY, "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
            "DATASETS.TEST", '("shapes_val10",)', "OUTPUT_DIR", out]
    log = _ok(run_train_net(args, cwd=tmp))
    return {"tmp": tmp, "out": out, "log": log, "register": register}


def test_train_writes_checkpoints_metrics_and_eval(trained):
    out = trained["out"]
    files = set(os.listdir(out))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint", "metrics.json",
            "config.yaml", "log.txt"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    rows = _metrics(out)
    iters = [r["iteration"] for r in rows if "total_loss" in r]
    assert iters == [0, 1, 2, 3]
    assert all(k in rows[0] for k in ("loss_cls", "loss_mask", "loss_rpn_cls", "lr"))
    final = [r for r in rows if "bbox/AP" in r]
    assert final and "segm/AP" in final[-1] and "bbox/AP50" in final[-1]
    assert all(final[-1][k] == final[-1][k] for k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")), final[-1]
    assert (out / "predictions_shapes_val10.png").stat().st_size > 0
    assert "Starting training from iteration 0" in trained["log"]


def test_resume_continues_from_last_checkpoint(trained):
    out = trained["out"]
    args = ["--config-file", DEMO_CONFIG, "--resume", *trained["register"], *TINY, "SOLVER.MAX_ITER", "6",
            "SOLVER.STEPS", "(3,)", "DATASETS.TEST", '("shapes_val10",)', "TEST.VIS_IMAGES", "0", "OUTPUT_DIR", out]
    log = _ok(run_train_net(args, cwd=trained["tmp"]))
    assert "Starting training from iteration 4" in log
    iters = [r["iteration"] for r in _metrics(out) if "total_loss" in r]
    assert iters == [0, 1, 2, 3, 4, 5]
    assert (out / "model_0000005.pth").exists()


def test_eval_only_register_coco(trained, shapes_root):
    """--eval-only with MODEL.WEIGHTS on a set registered by name from the command line (the training
    set is not needed for evaluation)."""
    out = trained["tmp"] / "eval"
    args = ["--config-file", DEMO_CONFIG, "--eval-only", *trained["register"], *TINY,
            "DATASETS.TRAIN", '("never_registered",)', "DATASETS.TEST", '("shapes_val10",)',
            "MODEL.WEIGHTS", trained["out"] / "model_final.pth", "OUTPUT_DIR", out]
    log = _ok(run_train_net(args, cwd=trained["tmp"]))
    assert "model_final.pth" in log
    with open(out / "eval_results.json") as f:
        res = json.load(f)
    assert {"AP", "AP50", "AP75"} <= set(res["bbox"]) and {"AP", "AP50"} <= set(res["segm"])
    assert (out / "predictions_shapes_val10.png").exists()
    assert (out / "inference" / "shapes_val10" / "coco_instances_results.json").exists()


def test_compiled_backbone_trains(tmp_path):
    """MODEL.UNIFIED.COMPILE True: the backbone runs through torch.compile for training at two input sizes
    (a recompile, then dynamic shapes) and the losses stay finite."""
    out = tmp_path / "out"
    args = ["--config-file", DEMO_CONFIG, *TINY, "MODEL.UNIFIED.COMPILE", "True",
            "INPUT.MIN_SIZE_TRAIN", "(64, 96)", "INPUT.MAX_SIZE_TRAIN", "128",
            "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)", "DATASETS.TEST", "()", "TEST.VIS_IMAGES", "0",
            "OUTPUT_DIR", out]
    _ok(run_train_net(args, cwd=tmp_path))
    losses = [r["total_loss"] for r in _metrics(out) if "total_loss" in r]
    assert len(losses) == 4 and all(loss == loss and loss < 1e3 for loss in losses), losses
