"""End to end on the generated shapes: train a few iterations (checkpoints, metrics.json, TensorBoard
events, COCO evaluation, predictions PNG), --resume from the last checkpoint, --eval-only, and
--register-coco of a COCO-format set by name."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from det_test_utils import DEMO_CONFIG, SMALL_OVERRIDES, run_train_net

from stm_det.checkpoint import load_weights_only

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
            "DATASETS.TEST", '("shapes_val10",)', "SOLVER.BEST_CHECKPOINT.METRIC", "bbox/AP50", "OUTPUT_DIR", out]
    log = _ok(run_train_net(args, cwd=tmp))
    return {"tmp": tmp, "out": out, "log": log, "register": register}


def test_train_writes_checkpoints_metrics_and_eval(trained):
    out = trained["out"]
    files = set(os.listdir(out))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint", "metrics.json",
            "config.yaml", "log.txt"} <= files
    assert any(f.startswith("events.out.tfevents") for f in files)
    # BestCheckpointer (SOLVER.BEST_CHECKPOINT.METRIC) wrote model_best.pth after the final evaluation,
    # without moving the resume pointer.
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    best, final = (load_weights_only(str(out / f"model_{n}.pth"))["model"] for n in ("best", "final"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)  # one evaluation
    assert "Saved first model at" in trained["log"]
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


# --------------------------------------------------------------------------------------------------
# demo.py and analyze_model.py on the model trained above; the LazyConfig path of train_net.py
# --------------------------------------------------------------------------------------------------

def _run_tool(script, args, cwd, timeout=600):
    import subprocess
    import sys

    from det_test_utils import APP_DIR

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(APP_DIR / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_demo_draws_and_saves_predictions(trained, shapes_root, tmp_path):
    """demo.py on a folder, a glob and single files, with one truncated and one missing image: a PNG of the
    image's size per readable image, predictions.json with the same detections as DefaultPredictor gives
    in this process, the bad files listed, exit status 1."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in (1, 2):
        shutil.copy(os.path.join(shapes_root, "val", f"{i:05d}.png"), folder / f"img{i}.png")
    data = (folder / "img2.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    glob_pattern = os.path.join(shapes_root, "val", "0000[3].png")
    weights = trained["out"] / "model_final.pth"
    out = tmp_path / "demo_out"
    args = ["--config-file", DEMO_CONFIG, "--input", folder, glob_pattern, tmp_path / "broken.png",
            tmp_path / "missing.jpg", "--output", out, "--confidence", "0.0", *SMALL_OVERRIDES,
            "MODEL.WEIGHTS", weights]
    proc = _run_tool("demo.py", args, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Skipped 2 unreadable image(s):" in proc.stderr
    assert str(tmp_path / "broken.png") in proc.stderr and str(tmp_path / "missing.jpg") in proc.stderr
    assert "Traceback" not in proc.stderr
    with open(out / "predictions.json") as f:
        pred = json.load(f)
    sources = [str(folder / "img1.png"), str(folder / "img2.png"), os.path.join(shapes_root, "val", "00003.png")]
    assert [im["file_name"] for im in pred["images"]] == sources
    assert [c["name"] for c in pred["categories"]] == ["circle", "square", "triangle"]
    assert [c["id"] for c in pred["categories"]] == [1, 2, 3]  # the json's category ids
    for im in pred["images"]:
        with Image.open(im["file_name"]) as src, Image.open(out / im["visualization"]) as png:
            assert png.size == src.size
    assert sorted(os.listdir(out)) == ["00003.png", "img1.png", "img2.png", "predictions.json"]

    # The same weights through detectron2's DefaultPredictor, in this process.
    from det_test_utils import load_cfg
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    cfg = load_cfg(DEMO_CONFIG, [*SMALL_OVERRIDES, "MODEL.WEIGHTS", str(weights),
                                 "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    expected = DefaultPredictor(cfg)(read_image(sources[0], format="BGR"))["instances"]
    got = [a for a in pred["annotations"] if a["image_id"] == 1]
    assert len(got) == len(expected) > 0
    boxes = np.array([a["bbox"] for a in got])
    ref = expected.pred_boxes.tensor.numpy()
    np.testing.assert_allclose(boxes[:, :2], ref[:, :2], atol=0.01)
    np.testing.assert_allclose(boxes[:, :2] + boxes[:, 2:], ref[:, 2:], atol=0.02)
    np.testing.assert_allclose([a["score"] for a in got], expected.scores.numpy(), atol=1e-5)
    assert all(a["segmentation"]["size"] == [im["height"], im["width"]] for a in got
               for im in pred["images"][:1])


def test_demo_usage_errors(trained, tmp_path, capsys):
    """demo.py's main() in this process: usage errors are `ERROR: ...` with exit status 2, nothing written."""
    import importlib.util

    from det_test_utils import APP_DIR

    spec = importlib.util.spec_from_file_location("stm_det_demo", APP_DIR / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    weights = ["MODEL.WEIGHTS", str(trained["out"] / "model_final.pth")]
    cases = [
        (["--config-file", str(tmp_path / "nope.yaml"), "--input", str(tmp_path), "--output", str(tmp_path / "o")],
         "ERROR: --config-file"),
        (["--config-file", str(DEMO_CONFIG), "--input", str(tmp_path / "*.nothing"), "--output", str(tmp_path / "o"),
          *weights], "matches no file"),
        (["--config-file", str(DEMO_CONFIG), "--input", str(tmp_path), "--output", str(tmp_path / "o"), *weights],
         "no image found"),
        (["--config-file", str(DEMO_CONFIG), "--input", __file__, "--output", str(tmp_path / "o"),
          "OUTPUT_DIR", str(tmp_path)], f"MODEL.WEIGHTS is empty and {tmp_path / 'model_final.pth'}"),
        (["--config-file", str(DEMO_CONFIG), "--input", __file__, "--output", str(tmp_path / "o"),
          "MODEL.WEIGHTS", str(tmp_path / "missing.pth")], f"{tmp_path / 'missing.pth'}: checkpoint not found"),
    ]
    for args, expected in cases:
        assert demo.main(args) == 2, args
        err = capsys.readouterr().err
        assert expected in err and err.startswith("ERROR: "), err[-3000:]
        assert not (tmp_path / "o").exists()


def test_analyze_model_counts_flops_and_parameters(trained, tmp_path):
    """Parameters: the total equals the model's own count; FLOPs: the trunk's share equals fvcore's count
    of the trunk alone on the padded input size that the detector fed it."""
    from det_test_utils import load_cfg
    from detectron2.modeling import build_model
    from fvcore.nn import FlopCountAnalysis

    opts = [*SMALL_OVERRIDES, "DATASETS.TEST", '("shapes_val10",)']
    proc = _run_tool("analyze_model.py", ["--config-file", DEMO_CONFIG, "--tasks", "flop", "parameter",
                                          "--num-inputs", "2", "--output", tmp_path, *trained["register"], *opts],
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Average GFLOPs per image over 2 image(s)" in proc.stdout and "Total parameters" in proc.stdout
    with open(tmp_path / "analysis.json") as f:
        res = json.load(f)
    model = build_model(load_cfg(DEMO_CONFIG, opts)).eval()
    assert res["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    images = res["flops"]["images"]
    assert len(images) == 2
    for im in images:
        h, w = (32 * math.ceil(s / 32) for s in im["input_size"])
        trunk = FlopCountAnalysis(model.backbone.bottom_up, torch.zeros(1, 3, h, w))
        trunk.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        assert im["backbone.bottom_up_flops"] == trunk.total() > 0
        assert im["flops"] > im["backbone_flops"] > im["backbone.bottom_up_flops"]


def test_lazy_config_trains(trained, tmp_path):
    """train_net.py with configs/lazy/mask_rcnn_unified_convnext_micro_fpn_1x_coco.py and key=value overrides:
    two iterations on the shapes, checkpoints (weights-only loadable), evaluation and model_best.pth."""
    from det_test_utils import CONFIGS_DIR

    out = tmp_path / "out"
    overrides = [
        "train.device=cpu", "train.max_iter=2", "train.checkpointer.period=1", "train.log_period=1",
        "train.eval_period=0", f"train.output_dir={out}", "train.best_checkpoint.metric=bbox/AP50",
        "lr_multiplier.scheduler.milestones=[1,2]", "lr_multiplier.scheduler.num_updates=3",
        "dataloader.train.dataset.names=stm_shapes_train", "dataloader.test.dataset.names=shapes_val10",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.mapper.augmentations.0.max_size=96",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "dataloader.test.mapper.augmentations.0.max_size=96",
        "model.roi_heads.num_classes=3", "model.roi_heads.batch_size_per_image=32",
        "model.roi_heads.box_predictor.test_score_thresh=0.0",
        "model.proposal_generator.pre_nms_topk=[100,100]", "model.proposal_generator.post_nms_topk=[50,50]",
        "model.backbone.bottom_up.drop_path_rate=0.0",
    ]
    config = CONFIGS_DIR / "lazy" / "mask_rcnn_unified_convnext_micro_fpn_1x_coco.py"
    proc = run_train_net(["--config-file", config, *trained["register"], *overrides], cwd=tmp_path)
    log = _ok(proc)
    assert "Starting training from iteration 0" in log
    rows = _metrics(out)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [0, 1]
    assert all(math.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)
    final = load_weights_only(str(out / "model_final.pth"))
    assert final["iteration"] == 1 and any(k.startswith("backbone.bottom_up.body.") for k in final["model"])
    assert any("bbox/AP50" in r for r in rows) and any("segm/AP" in r for r in rows)
    assert (out / "model_best.pth").exists() and (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "config.yaml").exists()
    # --eval-only with the trained weights gives the final evaluation again (same weights, same images).
    final_ap = [r for r in rows if "bbox/AP50" in r][-1]["bbox/AP50"]
    evaluated = tmp_path / "eval"
    args = ["--config-file", config, "--eval-only", *trained["register"], *overrides,
            f"train.output_dir={evaluated}", f"train.init_checkpoint={out / 'model_final.pth'}"]
    _ok(run_train_net(args, cwd=tmp_path))
    with open(evaluated / "eval_results.json") as f:
        res = json.load(f)
    assert res["bbox"]["AP50"] == pytest.approx(final_ap, abs=1e-6) and "AP" in res["segm"]
