"""Checkpoint safety: atomic writes, corrupt-file skipping on auto-resume, NaN loss stops cleanly."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from cls_test_utils import FAST_ARGS, NO_AUG_ARGS, read_log

import stm_cls.checkpoint as ckpt_io
import stm_cls.train as train_mod
from stm_cls.checkpoint import atomic_save, find_latest_loadable, load_file


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_atomic_save_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 0}, str(path))
    before = _digest(path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes of a zip archive")  # half-written, then the "disk fails"
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ckpt_io.WriteError, match="No space left"):
        atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 0}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert _digest(path) == before
    assert torch.equal(load_file(path)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint-0.pth"]  # no temp file left behind


def test_auto_resume_skips_corrupt_newest(tmp_path, capsys):
    atomic_save({"model": {"w": torch.ones(1000)}, "epoch": 1}, str(tmp_path / "checkpoint-1.pth"))
    whole = (tmp_path / "checkpoint-1.pth").read_bytes()
    (tmp_path / "checkpoint-3.pth").write_bytes(b"garbage")
    (tmp_path / "checkpoint-2.pth").write_bytes(whole[: len(whole) // 2])  # a truncated zip archive
    atomic_save({"model": {}, "epoch": "best"}, str(tmp_path / "checkpoint-best.pth"))
    path, ckpt = find_latest_loadable(str(tmp_path))
    assert path.endswith("checkpoint-1.pth") and ckpt["epoch"] == 1
    err = capsys.readouterr().err
    assert "cannot load" in err and "checkpoint-2.pth" in err and "checkpoint-3.pth" in err


def test_nan_loss_stops_and_keeps_last_checkpoint(cls_main, tiny_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", str(tiny_dataset), "--output_dir", str(out), "--epochs", "3"]
    real_build = train_mod.build_mixup_and_criterion
    assert cls_main.main([*argv[:-1], "1"]) == 0  # a healthy first epoch (epochs=1 just to stop there)
    good = out / "checkpoint-0.pth"
    before = _digest(good)

    calls = {"n": 0}

    def nan_after_two_steps(args):
        mixup_fn, criterion = real_build(args)

        def poisoned(output, target):
            calls["n"] += 1
            loss = criterion(output, target)
            return loss * float("nan") if calls["n"] > 2 else loss

        return mixup_fn, poisoned

    monkeypatch.setattr(train_mod, "build_mixup_and_criterion", nan_after_two_steps)
    capsys.readouterr()
    assert cls_main.main(argv) == 3  # resumes from checkpoint-0, then diverges in epoch 1
    err = capsys.readouterr().err
    assert "loss is nan" in err and "epoch 1" in err
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0.pth", "checkpoint-best-ema.pth",
                                                                      "checkpoint-best.pth"]
    assert _digest(good) == before
    assert load_file(good)["epoch"] == 0
    assert [r["epoch"] for r in read_log(out)] == [0]
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_safe_loading_of_own_checkpoints(tmp_path):
    ckpt_io.atomic_save({"model": {}, "args": ckpt_io.argparse.Namespace(lr=1.0, opt_betas=[0.9, 0.99])},
                        str(tmp_path / "c.pth"))
    assert torch.load(tmp_path / "c.pth", weights_only=True)["args"].opt_betas == [0.9, 0.99]
