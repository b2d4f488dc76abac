"""analyze.py end to end: outputs of every analysis for several models, user errors, and torchrun
(2 CPU processes, gloo) giving exactly the single-process numbers."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cls_test_utils import APP_DIR, NUM_CLASSES, REPO_ROOT, subprocess_env

ANALYZE_PY = APP_DIR / "analyze.py"
MODELS = ("unified_convnext_micro", "unified_swin_micro")


@pytest.fixture(scope="module")
def analyze():
    spec = importlib.util.spec_from_file_location("stm_cls_analyze", ANALYZE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Training-app style checkpoints ({'model', 'args', ...}) of random micro models for 4 classes."""
    import timm

    import stm_backbones  # noqa: F401

    folder = tmp_path_factory.mktemp("ckpts")
    paths = []
    for i, name in enumerate(MODELS):
        torch.manual_seed(i)
        model = timm.create_model(name, num_classes=NUM_CLASSES, img_size=32)
        path = folder / f"{name}.pth"
        torch.save({"model": model.state_dict(), "epoch": 3, "args": argparse.Namespace(model=name)}, path)
        paths.append(str(path))
    return paths


def common_args(tiny_dataset, checkpoints, out):
    args = ["--data_path", str(tiny_dataset), "--nb_classes", str(NUM_CLASSES), "--output_dir", str(out),
            "--num_workers", "0"]
    for name, ckpt in zip(MODELS, checkpoints):
        args += ["--model", name, "--resume", ckpt]
    return args


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_invariance_outputs(analyze, tiny_dataset, checkpoints, tmp_path):
    out = tmp_path / "inv"
    assert analyze.main(["invariance", *common_args(tiny_dataset, checkpoints, out), "--input_size", "32",
                         "--num_images", "4"]) == 0
    res = read_json(out / "invariance.json")["models"]
    assert list(res) == list(MODELS)
    for r in res.values():
        assert r["num_images"] == 4
        lengths = {t: len(r[t]) for t in ("translation", "pre_rotation", "post_rotation", "scale")}
        assert lengths == {"translation": 17, "pre_rotation": 19, "post_rotation": 19, "scale": 15}
        assert set(r["translation"][0]) >= {"strength", "top1", "top5", "consistency", "soft_ce", "shift_px"}
        assert r["post_rotation"][0]["consistency"] == 100.0
    with open(out / "invariance.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (1 + 17 + 19 + 19 + 15)
    assert (out / "invariance.png").stat().st_size > 10_000


def test_erf_and_robustness_outputs(analyze, tiny_dataset, checkpoints, tmp_path):
    out = tmp_path / "erf"
    assert analyze.main(["erf", *common_args(tiny_dataset, checkpoints, out), "--input_size", "32",
                         "--num_images", "4", "--batch_size", "2"]) == 0
    res = read_json(out / "erf.json")["models"]
    for r in res.values():
        assert list(r) == ["stage1", "stage2", "stage3", "stage4"]
        for stage in r.values():
            assert stage["num_images"] == 4
            ratios = [stage[t]["area_ratio"] for t in ("0.2", "0.3", "0.5", "0.99")]
            assert ratios == sorted(ratios) and 0 < ratios[-1] <= 1
    assert (out / "erf.png").exists() and (out / "erf_area.png").exists() and (out / "erf.csv").exists()
    with np.load(out / "erf_maps.npz") as maps:
        assert maps[f"{MODELS[1]}/stage4"].shape == (64, 64)  # the mean maps at 2 x 32 px

    out = tmp_path / "rob"
    assert analyze.main(["robustness", *common_args(tiny_dataset, checkpoints, out), "--input_size", "32",
                         "--num_images", "4", "--eps", "0", "8", "--pgd_steps", "2"]) == 0
    res = read_json(out / "robustness.json")["models"]
    for r in res.values():
        assert [e["eps"] for e in r["fgsm"]] == [0.0, 8.0] and [e["eps"] for e in r["pgd"]] == [0.0, 8.0]
        assert r["fgsm"][0]["top1"] == r["clean_top1"] == r["pgd"][0]["top1"]
    assert (out / "robustness.png").exists() and (out / "robustness.csv").exists()


def test_quirks_use_a_quarter_of_the_erf_images(analyze, tiny_dataset, checkpoints, tmp_path):
    out = tmp_path / "q"
    args = ["erf", "--data_path", str(tiny_dataset), "--nb_classes", "4", "--output_dir", str(out), "--model", MODELS[0],
            "--resume", checkpoints[0], "--input_size", "32", "--num_images", "8", "--reference_quirks", "true",
            "--num_workers", "0"]
    assert analyze.main(args) == 0
    assert read_json(out / "erf.json")["models"][MODELS[0]]["stage1"]["num_images"] == 2


def test_cost_sweep(analyze, tmp_path):
    out = tmp_path / "cost"
    assert analyze.main(["cost", "--model", MODELS[0], "--input_size", "64", "--sizes", "64", "128", "--batch_size", "2",
                         "--warmup", "0", "--iters", "1", "--output_dir", str(out)]) == 0
    res = read_json(out / "cost.json")["models"][MODELS[0]]
    assert len(res["classification"]) == 4  # inference/training x fp32/amp
    dense = res["dense"]
    assert {(e["input_size"], e["mode"], e["precision"]) for e in dense} == {
        (s, m, p) for s in (64, 128) for m in ("inference", "training") for p in ("fp32", "amp")}
    assert all(e["images_per_sec"] > 0 for e in dense)
    flops = {e["input_size"]: e["gflops_per_image"] for e in dense}
    assert flops[128] > 3.5 * flops[64]  # a conv trunk's FLOPs grow with the number of pixels
    assert (out / "cost.png").exists() and (out / "cost.csv").exists()


@pytest.mark.parametrize("argv,message", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", MODELS[0], "--model", MODELS[1], "--resume", "a.pth"], "2 --model but 1 --resume"),
    (["--model", MODELS[0], "--resume", "/nonexistent/ckpt.pth"], "file not found"),
    (["--model", MODELS[0], "--num_images", "0"], "--num_images must be positive"),
])
def test_user_errors_exit_2(analyze, capsys, tmp_path, argv, message):
    assert analyze.main(["invariance", *argv, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and message in err, err


def test_unreadable_and_mismatched_checkpoints_exit_2(analyze, capsys, tiny_dataset, checkpoints, tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    base = ["robustness", "--data_path", str(tiny_dataset), "--nb_classes", "4", "--output_dir", str(tmp_path),
            "--num_workers", "0"]
    assert analyze.main([*base, "--model", MODELS[0], "--resume", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: --resume") and "garbage.pth" in err, err
    # swin's checkpoint given to convnext
    assert analyze.main([*base, "--model", MODELS[0], "--resume", checkpoints[1]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "cannot be used for model 'unified_convnext_micro'" in err, err
    # Halo's classification model only takes sides of 224 k: named before any work
    assert analyze.main([*base, "--model", "unified_halo_micro", "--input_size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: model 'unified_halo_micro' cannot run at 32x32 px"), err


@pytest.mark.parametrize("analysis,extra,models", [
    ("invariance", ["--transforms", "translation", "--batch_size", "36"], 2),  # 18 views: 2 images per batch
    ("robustness", ["--eps", "0", "16", "--pgd_steps", "2", "--batch_size", "3"], 1),
    ("erf", ["--num_images", "10", "--batch_size", "3"], 1),
])
def test_torchrun_two_processes_equal_one(analyze, tiny_dataset, checkpoints, tmp_path, analysis, extra, models):
    args = [analysis, *common_args(tiny_dataset, checkpoints, tmp_path / "one"), "--input_size", "32", *extra]
    if models == 1:  # keep only the first --model/--resume pair
        second = args.index("--model", args.index("--model") + 1)
        del args[second:second + 4]
    assert analyze.main(args) == 0
    single = read_json(tmp_path / "one" / f"{analysis}.json")
    args[args.index("--output_dir") + 1] = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ANALYZE_PY), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(1), cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "distributed init (rank 1/2" in proc.stdout + proc.stderr
    double = read_json(tmp_path / "two" / f"{analysis}.json")
    assert double["config"]["world_size"] == 2 and single["config"]["world_size"] == 1
    assert double["models"] == single["models"]  # every number, exactly (counts: 15 images, none twice)
    first = next(iter(single["models"].values()))
    count = first["num_images"] if "num_images" in first else first["stage1"]["num_images"]
    assert count == (10 if analysis == "erf" else 15)
