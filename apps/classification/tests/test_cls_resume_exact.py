"""A run killed at an arbitrary moment and auto-resumed reproduces the uninterrupted run exactly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from cls_test_utils import FAST_ARGS, MAIN_PY, REPO_ROOT, read_log, run_cli, subprocess_env

from stm_cls.checkpoint import load_file

EPOCHS = 4


def _argv(data, out):
    # Full augmentation (RandAugment, mixup/cutmix, random erasing) so every random stream matters.
    return [*FAST_ARGS, "--data_path", data, "--output_dir", out, "--epochs", EPOCHS, "--seed", "3"]


def test_killed_run_resumes_identically(tiny_dataset, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    ref = run_cli(_argv(tiny_dataset, reference))
    assert ref.returncode == 0, ref.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, str(MAIN_PY), *map(str, _argv(tiny_dataset, killed))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
                            cwd=str(REPO_ROOT))
    deadline = time.time() + 120
    while not (killed / "checkpoint-0.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no cleanup code runs: as hard as a node failure
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / f"checkpoint-{EPOCHS - 1}.pth").exists()
    for path in killed.glob("checkpoint-*.pth"):  # whatever the kill interrupted, saved files are whole
        load_file(path)

    resumed = run_cli(_argv(tiny_dataset, killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resume checkpoint" in resumed.stdout

    want, got = read_log(reference), read_log(killed)
    assert [r["epoch"] for r in got] == list(range(EPOCHS))
    assert [r["train_loss"] for r in got] == [r["train_loss"] for r in want]
    assert [r["test_acc1"] for r in got] == [r["test_acc1"] for r in want]
    assert [r["test_loss_ema"] for r in got] == [r["test_loss_ema"] for r in want]
