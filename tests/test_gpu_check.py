"""`nox -s gpu_check` (benchmarks/gpu_check.py) on this CPU-only machine: the dry run lists every step
with the exact commands that packages/cuda_ops/README.md documents, a real run without a GPU fails
loudly before doing anything, the checks of the steps' outputs fail on what they must fail on, and the
in-process steps run end to end at toy sizes on the CPU (the GPU run itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["device", "build", "verify_build", "cuda_tests", "op_benchmark", "models", "classification", "detection",
         "report"]


def _run(*argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_every_step_and_the_documented_commands():
    result = _run("--dry-run", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"gpu_check: {len(STEPS)} steps (dry run")
    listed = [line.split(".", 1)[1].split(":", 1)[0].strip() for line in lines[1:] if not line.startswith("    ")]
    assert listed == STEPS
    commands = [line.strip()[2:] for line in lines if line.startswith("    $ ")]
    assert len(commands) == 7
    readme = (ROOT / "packages" / "cuda_ops" / "README.md").read_text()
    for cmd in commands:  # the README shows exactly what gpu_check runs
        assert cmd in readme, cmd
    assert "python apps/classification/main.py" in "\n".join(commands)
    assert "python apps/detection/train_net.py" in "\n".join(commands)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_fails_loudly_and_writes_nothing():
    before = set((ROOT / "benchmarks" / "results").rglob("gpu_check_*"))
    result = _run(timeout=120)
    assert result.returncode == 2
    assert "ERROR: no CUDA device" in result.stderr and "--dry-run" in result.stderr
    assert "Traceback" not in result.stderr
    assert set((ROOT / "benchmarks" / "results").rglob("gpu_check_*")) == before


def _junit(tmp_path, skipped_reason=None, failures=0):
    skipped = f'<testcase classname="t" name="b"><skipped message="{skipped_reason}"/></testcase>' if skipped_reason else ""
    text = (f'<testsuites><testsuite tests="{2 if skipped_reason else 1}" failures="{failures}" errors="0" '
            f'skipped="{1 if skipped_reason else 0}"><testcase classname="t" name="a"/>{skipped}</testsuite></testsuites>')
    path = tmp_path / "junit.xml"
    path.write_text(text)
    return path


def test_cuda_test_report_allows_only_explained_memory_skips(gpu_check, tmp_path):
    ok = gpu_check.check_cuda_tests(_junit(tmp_path, "memory: needs about 20 GiB, 8 free"))
    assert ok["skipped"] == 1 and ok["skipped_tests"][0]["reason"].startswith("memory:")
    with pytest.raises(gpu_check.CheckFailed, match="skipped"):
        gpu_check.check_cuda_tests(_junit(tmp_path, "needs a CUDA device"))
    with pytest.raises(gpu_check.CheckFailed, match="1 failed"):
        gpu_check.check_cuda_tests(_junit(tmp_path, failures=1))


def test_classification_check_needs_the_scaler_and_the_accuracy(gpu_check, tmp_path):
    rows = [{"epoch": 0, "train_loss": 1.0, "train_loss_scale": 65536.0, "test_acc1": 80.0},
            {"epoch": 1, "train_loss": 0.5, "train_loss_scale": 65536.0, "test_acc1": 93.0}]
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert gpu_check.check_classification(tmp_path)["test_acc1"] == 93.0
    rows[1]["test_acc1"] = 12.0
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(gpu_check.CheckFailed, match="below"):
        gpu_check.check_classification(tmp_path)
    for r in rows:
        r.pop("train_loss_scale")
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(gpu_check.CheckFailed, match="GradScaler"):
        gpu_check.check_classification(tmp_path)


def test_model_and_op_steps_run_at_toy_sizes_on_the_cpu(tmp_path):
    """Also: a model that fails fails the step (exit 1, named) without hiding the other models' rows."""
    record = tmp_path / "models.json"
    result = _run("--step", "models", "--device", "cpu", "--models", "no_such_model", "unified_convnext_micro",
                  "unified_dcn_v3_micro", "--batch-size", "2", "--img-size", "32", "--warmup", "0", "--iters", "1",
                  "--record", str(record))
    assert result.returncode == 1 and "ERROR: no_such_model" in result.stderr, result.stderr[-3000:]
    saved = json.loads(record.read_text())
    assert "no_such_model" in saved["error"]
    rows = saved["rows"]
    assert [r["model"] for r in rows] == ["unified_convnext_micro", "unified_dcn_v3_micro"]
    assert all(r["train_images_per_s"] > 0 and r["eval_images_per_s"] > 0 for r in rows)
    record = tmp_path / "op.json"
    result = _run("--step", "op_benchmark", "--device", "cpu", "--stages", "stage3", "stage4", "--warmup", "0",
                  "--iters", "1", "--record", str(record))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(record.read_text())["rows"]
    assert [r["stage"] for r in rows] == ["stage3", "stage4"]
    assert all(r["max_abs_diff_vs_reference"] < 1e-4 for r in rows)


def _fake_run(gpu_check, monkeypatch, tmp_path, steps):
    """run_all with a fake device and harmless commands in place of the GPU steps."""
    monkeypatch.setattr(gpu_check, "step_device", lambda args: {"name": "Fake GPU 9000", "arch": "9.0",
                                                                "capability": "9.0"})
    monkeypatch.setattr(gpu_check, "plan", lambda arch: steps)
    monkeypatch.setattr(gpu_check, "WORK", tmp_path / "work")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    rc = gpu_check.run_all(None)
    results = json.loads((tmp_path / "results" / "gpu_check_fake_gpu_9000.json").read_text())
    markdown = (tmp_path / "results" / "gpu_check_fake_gpu_9000.md").read_text()
    return rc, results, markdown


def _py(code):
    return ["python", "-c", code]


def test_driver_reports_every_step_and_fails_on_a_failed_one(gpu_check, monkeypatch, tmp_path):
    log_rows = [{"train_loss_scale": 1024.0, "test_acc1": 60.0}, {"train_loss_scale": 1024.0, "test_acc1": 91.0}]
    write_log = ("import json, os, sys; d = sys.argv[1]; os.makedirs(d, exist_ok=True); "
                 f"open(os.path.join(d, 'log.txt'), 'w').write(''.join(json.dumps(r) + chr(10) for r in {log_rows!r}))")
    steps = [dict(name="device", what="d", cmd=None),
             dict(name="build", what="b", cmd=_py("print('built')"), required=True),
             dict(name="classification", what="c", cmd=[*_py(write_log), str(tmp_path / "work" / "cls_digits")]),
             dict(name="detection", what="e", cmd=_py("import sys; print('boom'); sys.exit(3)")),
             dict(name="report", what="r", cmd=None)]
    rc, results, markdown = _fake_run(gpu_check, monkeypatch, tmp_path, steps)
    assert rc == 1 and results["failed"] == ["detection"] and not results["passed"]
    assert [(s["name"], s["status"]) for s in results["steps"]] == [
        ("build", "ok"), ("classification", "ok"), ("detection", "FAILED")]
    assert results["steps"][1]["result"]["test_acc1"] == 91.0
    assert "exited with 3" in results["steps"][2]["error"] and "boom" in results["steps"][2]["error"]
    assert "# gpu_check on Fake GPU 9000" in markdown and "| detection | FAILED |" in markdown


def test_driver_stops_after_a_failed_required_step(gpu_check, monkeypatch, tmp_path):
    steps = [dict(name="device", what="d", cmd=None),
             dict(name="build", what="b", cmd=_py("import sys; sys.exit(1)"), required=True),
             dict(name="detection", what="e", cmd=_py("print('never')")),
             dict(name="report", what="r", cmd=None)]
    rc, results, _ = _fake_run(gpu_check, monkeypatch, tmp_path, steps)
    assert rc == 1
    assert [(s["name"], s["status"]) for s in results["steps"]] == [("build", "FAILED"), ("detection", "NOT RUN")]
