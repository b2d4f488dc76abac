"""The study runner: a two-model study writes its report and JSON; a study killed during the second training
resumes without redoing the first and ends with the numbers of an uninterrupted run; the report's numbers are
the JSON's; submitit's local executor runs the trainings as jobs; bad arguments exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cls_test_utils import APP_DIR, FAST_ARGS, NO_AUG_ARGS, REPO_ROOT, subprocess_env

STUDY_PY = APP_DIR / "study.py"
MODELS = ["unified_convnext_micro", "unified_pvt_micro"]
# The fast recipe of the other app tests, for every model (the study sets --model itself).
TRAIN_ARGS = [a for i, a in enumerate(FAST_ARGS) if a != "--model" and FAST_ARGS[i - 1] != "--model"] + NO_AUG_ARGS
ANALYSIS_ARGS = "--eps 0 2 --pgd_steps 2"


def _command(data, out, *extra):
    return [sys.executable, str(STUDY_PY), "--models", *MODELS, "--data_path", str(data), "--epochs", "2",
            "--analyses", "robustness", "--analysis_args", ANALYSIS_ARGS, "--output_dir", str(out), *extra,
            "--", *TRAIN_ARGS]


def _run(cmd, timeout=900):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(1),
                          cwd=str(REPO_ROOT))


def _numbers(study: dict) -> dict:
    """What must not depend on an interruption: the accuracies and every analysis number."""
    models = {m: {k: v[k] for k in ("final", "final_ema", "best_top1", "best_top1_ema", "epochs")}
              for m, v in study["models"].items()}
    return {"models": models, "robustness": study["analyses"]["robustness"]["data"]["models"]}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    result = _run(_command(tiny_dataset, out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def test_study_writes_report_and_json(uninterrupted):
    out = uninterrupted
    study = json.loads((out / "study.json").read_text())
    assert list(study["models"]) == MODELS
    for model in MODELS:
        m = study["models"][model]
        assert m["epochs"] == 2 and len(m["curve"]) == 2
        assert 0 <= m["final"]["top1"] <= 100 and m["final"]["num_images"] == 15
        assert m["final_ema"] is not None
        # the final evaluation of the last epoch's weights is the accuracy logged for that epoch
        assert m["final"]["top1"] == pytest.approx(m["curve"][-1]["test_acc1"], abs=1e-3)
        assert m["study"]["imagenet_top1"] > 70  # the study's published figure, placed beside ours
        assert m["params_m"] > 1
    robustness = study["analyses"]["robustness"]["data"]
    assert set(robustness["models"]) >= set(MODELS)
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2  # self-contained figures
    state = json.loads((out / "state.json").read_text())
    assert all(s["status"] == "done" for s in state["steps"].values())


def test_report_numbers_equal_the_json(uninterrupted):
    study = json.loads((uninterrupted / "study.json").read_text())
    report = (uninterrupted / "report.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]]
            for line in report.splitlines() if line.startswith("| `")}
    assert set(rows) == set(MODELS)
    for model, cells in rows.items():
        m = study["models"][model]
        assert cells[0] == str(m["input_size"]) == "32"
        assert cells[1] == f"{m['params_m']:.2f}" and cells[2] == f"{m['gflops']:.3f}"
        assert cells[3] == f"{m['final']['top1']:.2f}" and cells[4] == f"{m['final']['top5']:.2f}"
        assert cells[5] == f"{m['final_ema']['top1']:.2f}" and cells[7] == f"{m['best_top1']:.2f}"
        assert cells[12] == f"{m['study']['imagenet_top1']:.1f}"


def test_killed_study_resumes_without_redoing_finished_work(uninterrupted, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    cmd = _command(tiny_dataset, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(1),
                            cwd=str(REPO_ROOT), start_new_session=True)
    second = out / "train" / MODELS[1]
    try:
        # Kill the study (and its training) once the second model has saved its first epoch.
        deadline = time.monotonic() + 900
        while not (second / "checkpoint-0.pth").exists():
            assert proc.poll() is None, "the study ended before it could be killed"
            assert time.monotonic() < deadline, "the second training never saved a checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (second / "checkpoint-1.pth").exists(), "killed too late: the second training had finished"
    state = json.loads((out / "state.json").read_text())
    assert state["steps"][f"train:{MODELS[0]}"]["status"] == "done"
    assert state["steps"][f"train:{MODELS[1]}"]["status"] == "running"

    result = _run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"train:{MODELS[0]}: done before, skipped" in result.stdout
    first_log = (out / "train" / MODELS[0] / "train.log").read_text()
    assert first_log.count("\n=== ") == 1  # the first training ran once
    second_log = (second / "train.log").read_text()
    assert second_log.count("\n=== ") == 2 and "Resume checkpoint" in second_log  # resumed from its checkpoint
    resumed = json.loads((out / "study.json").read_text())
    reference = json.loads((uninterrupted / "study.json").read_text())
    assert _numbers(resumed) == _numbers(reference)


def test_submitit_local_executor_runs_trainings_as_jobs(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(STUDY_PY), "--models", MODELS[0], "--data_path", str(tiny_dataset), "--epochs", "1",
           "--analyses", "none", "--launcher", "submitit_local", "--output_dir", str(out), "--", *TRAIN_ARGS]
    result = _run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job" in result.stdout
    assert list((out / "jobs").iterdir()), "no submitit job folder"
    log = (out / "train" / MODELS[0] / "train.log").read_text()
    assert "submitit (submitit_local)" in log and "Start training" in log
    study = json.loads((out / "study.json").read_text())
    assert study["models"][MODELS[0]]["epochs"] == 1 and study["models"][MODELS[0]]["final"]["num_images"] == 15


@pytest.mark.parametrize("extra, message", [
    (["--models", "unified_nope_micro"], "unknown model"),
    (["--analyses", "erf,colour"], "unknown analysis"),
    (["--checkpoint", "unified_convnext_micro=/no/such.pth"], "file not found"),
    (["--checkpoint", "unified_swin_micro=x.pth"], "not one of --models"),
    (["--", "--model", "x"], "set by the study"),
])
def test_bad_arguments_exit_2(tmp_path, extra, message):
    cmd = [sys.executable, str(STUDY_PY), "--output_dir", str(tmp_path / "o"), "--models", "unified_convnext_micro"]
    if extra[0] == "--":
        cmd += extra
    else:
        cmd = cmd[:-2] + (extra if extra[0] == "--models" else ["--models", "unified_convnext_micro", *extra])
    result = _run(cmd, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "ERROR:" in result.stderr and message in result.stderr and "Traceback" not in result.stderr


def test_per_model_input_size_and_analysis_groups(tmp_path):
    from stm_cls.study.runner import StudyConfig, analysis_dir, model_input_size, size_groups

    cfg = StudyConfig(models=["unified_halo_micro", "unified_convnext_micro"], output_dir=tmp_path)
    # U-HaloNet needs sides of 224·k (block size 7 at every stage): the digits' 32 px cannot work for it
    cfg.input_sizes = {m: model_input_size(cfg, m) for m in cfg.models}
    assert cfg.input_sizes == {"unified_halo_micro": 224, "unified_convnext_micro": 32}
    assert size_groups(cfg) == {224: ["unified_halo_micro"], 32: ["unified_convnext_micro"]}
    assert analysis_dir(cfg, 32, "erf") == tmp_path / "analyses" / "32px"
    assert analysis_dir(cfg, 224, "cost") == tmp_path / "analyses"  # cost measures everything at 224 px
    explicit = StudyConfig(models=cfg.models, output_dir=tmp_path, train_args=["--input_size", "64"])
    assert {m: model_input_size(explicit, m) for m in cfg.models} == dict.fromkeys(cfg.models, 64)


def test_default_models_are_the_smallest_of_the_study_mixers():
    import stm_backbones
    from stm_cls.study.runner import default_models

    assert default_models() == [family.smallest for family in stm_backbones.list_families(study=True)]
    assert sorted(default_models()) == [f"unified_{m}_micro" for m in ("convnext", "dcn_v3", "halo", "pvt", "swin")]


def test_one_input_size_search_for_training_and_study():
    """The study's per-model size and the training's suggestions both come from stm_cls.models.sizes_that_work
    (the block's input_size_error rule)."""
    import timm
    import torch

    from stm_cls import models, train

    assert train.sizes_that_work is models.sizes_that_work
    swin = timm.create_model("unified_swin_micro", img_size=64)
    assert models.input_size_error(swin, 100) and models.input_size_error(swin, 96) is None
    assert models.sizes_that_work(swin, 100) == [64, 96, 128, 160]
    halo = timm.create_model("unified_halo_micro", img_size=32)
    assert models.sizes_that_work(halo, 32, count=1, larger_only=True, multiple_of=32) == [224]
    assert models.sizes_that_work(torch.nn.Linear(2, 2), 100) == []  # no mixer block, no rule
