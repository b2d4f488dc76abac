"""Nothing lost, nothing run from a file, every bad input named (issue 11, classification side).

Each test first reproduces the failure the issue describes (a crafted pickle executing code, a best
checkpoint lost to a kill between two writes, random weights evaluated silently, ...), then checks the fix.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from cls_test_utils import FAST_ARGS, NO_AUG_ARGS, run_cli, write_folder_dataset

import stm_cls.checkpoint as ckpt_io
import stm_cls.train as train_mod
from stm_cls.datasets import SKIPPED, DatasetError, ImageListDataset, collate_skipping, scan_class_folders
from stm_cls.engine import evaluate


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Killed(BaseException):
    """Stands for kill -9 at an exact moment (nothing after it runs, no handler catches it)."""


def _micro_state_dict():
    import timm

    import stm_backbones  # noqa: F401

    return timm.create_model("unified_convnext_micro", num_classes=4, img_size=32).state_dict()


def _train_args(data, out, *extra):
    return list(map(str, [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--output_dir", out, *extra]))


# ------------------------------------------------------------------------------------ 1. code execution
def test_crafted_checkpoint_is_refused_not_executed(tiny_dataset, tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": _micro_state_dict(), "extra": _Payload(marker)}, evil)
    result = run_cli([*FAST_ARGS, "--data_path", tiny_dataset, "--eval", "true", "--resume", evil])
    assert result.returncode == 2, result.stderr
    assert not marker.exists(), "the crafted checkpoint ran code"
    assert "ERROR:" in result.stderr and "Traceback" not in result.stderr
    assert "posix.system" in result.stderr and "--trust_checkpoint" in result.stderr

    # The explicit, documented opt-in does unpickle it (proof that the refusal above was the guard).
    trusted = run_cli([*FAST_ARGS, "--data_path", tiny_dataset, "--eval", "true", "--resume", evil,
                       "--trust_checkpoint", "true"])
    assert trusted.returncode == 0, trusted.stderr
    assert marker.exists()


def test_auto_resume_skips_crafted_checkpoint(cls_main, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "1")) == 0
    marker = tmp_path / "PWNED"
    good = torch.load(out / "checkpoint-0.pth", weights_only=True)
    torch.save({**good, "epoch": 5, "extra": _Payload(marker)}, out / "checkpoint-5.pth")
    capsys.readouterr()
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "2")) == 0
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "checkpoint-5.pth" in err and "posix.system" in err
    assert torch.load(out / "checkpoint-1.pth", weights_only=True)["epoch"] == 1  # resumed from epoch 0


def test_own_checkpoints_load_weights_only(cls_main, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "1")) == 0
    for name in ("checkpoint-0.pth", "checkpoint-best.pth", "checkpoint-best-ema.pth"):
        ckpt = ckpt_io.load_file(out / name)
        assert set(ckpt) >= {"model", "model_ema", "optimizer", "args", "rng_states", "best_epochs"}


# ------------------------------------------------------------------------------------ 3. best checkpoints
def _scripted_accuracy(monkeypatch, accuracies: dict[int, float], state: dict):
    """evaluate() returns accuracies[epoch] (model and EMA alike): which epoch is best is then known."""

    def fake_evaluate(loader, model, device, *args, **kwargs):
        acc = accuracies[state["epoch"]]
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # model, then EMA: the epoch is over
            state["epoch"] += 1
        return dict(acc1=acc, acc5=acc, loss=1.0, num_images=15, images_per_sec=1.0, num_skipped=0)

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)


def test_best_checkpoint_survives_kill_between_epoch_and_best_write(cls_main, tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    state = {"epoch": 0, "calls": 0}
    _scripted_accuracy(monkeypatch, {0: 10.0, 1: 20.0, 2: 5.0}, state)  # epoch 1 is the best
    real_publish = ckpt_io.publish_best

    def kill_at_epoch_1(source, target):
        if source.endswith("checkpoint-1.pth"):
            raise Killed  # checkpoint-1.pth (recording the new best) is written; the best file is not
        return real_publish(source, target)

    monkeypatch.setattr(ckpt_io, "publish_best", kill_at_epoch_1)
    argv = _train_args(tiny_dataset, out, "--epochs", "3", "--save_ckpt_num", "1")
    with pytest.raises(Killed):
        cls_main.main(argv)
    assert ckpt_io.load_file(out / "checkpoint-best.pth")["epoch"] == 0  # stale: what the old code kept for good

    monkeypatch.setattr(ckpt_io, "publish_best", real_publish)
    state.update(epoch=2, calls=0)
    assert cls_main.main(argv) == 0  # resumes from checkpoint-1, repairs the best files, trains epoch 2
    assert not (out / "checkpoint-1.pth").exists()  # rolled away (--save_ckpt_num 1) ...
    for kind in ("best", "best-ema"):  # ... but the best files still hold epoch 1
        best = ckpt_io.load_file(out / f"checkpoint-{kind}.pth")
        assert best["epoch"] == 1 and best["max_accuracy"] == 20.0


def test_best_files_are_atomic_hard_links(cls_main, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "1")) == 0
    epoch_file = os.stat(out / "checkpoint-0.pth")
    for kind in ("best", "best-ema"):
        assert os.stat(out / f"checkpoint-{kind}.pth").st_ino == epoch_file.st_ino  # no second copy
    assert epoch_file.st_nlink == 3
    assert not [n for n in os.listdir(out) if ".tmp-" in n]


def test_publish_best_copies_when_linking_fails(tmp_path, monkeypatch):
    source, target = tmp_path / "checkpoint-3.pth", tmp_path / "checkpoint-best.pth"
    ckpt_io.atomic_save({"model": {"w": torch.arange(5.0)}, "epoch": 3}, str(source))
    target.write_bytes(b"old best")

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    assert ckpt_io.publish_best(str(source), str(target)) == "copy"
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_ino != os.stat(source).st_ino


# ------------------------------------------------------------------------------------ 5. silent wrong results
def test_eval_without_weights_is_refused(cls_main, tiny_dataset, tmp_path, capsys):
    argv = [*FAST_ARGS, "--data_path", str(tiny_dataset), "--eval", "true"]
    assert cls_main.main(argv) == 2
    assert "--eval_random_weights" in capsys.readouterr().err
    assert cls_main.main([*argv, "--eval_random_weights", "true"]) == 0


def test_empty_class_folder_is_named(tmp_path):
    root = write_folder_dataset(tmp_path / "d")
    (root / "train" / "class_9").mkdir()
    with pytest.raises(DatasetError, match=r"class_9"):
        scan_class_folders(str(root / "train"))
    empty_val = root / "val" / "class_1"
    shutil.rmtree(root / "train" / "class_9")
    for f in empty_val.iterdir():
        f.unlink()
    classes = {c: i for i, c in enumerate(["class_0", "class_1", "class_2"])}
    with pytest.raises(DatasetError, match=r"val/class_1"):
        scan_class_folders(str(root / "val"), classes)


def test_corrupt_validation_image_is_skipped_and_counted_once(tiny_dataset, tmp_path):
    data = shutil.copytree(tiny_dataset, tmp_path / "data")
    lines = (data / "meta" / "val.txt").read_text().split()
    samples = [(lines[i], int(lines[i + 1])) for i in range(0, len(lines), 2)]
    bad = 4
    (data / "val" / samples[bad][0]).write_bytes(b"\x89PNG\r\n truncated")
    from torchvision import transforms as T

    transform = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    ds = ImageListDataset(str(data / "val"), samples, transform, skip_unreadable=True)
    assert ds[bad] is SKIPPED and ds[bad + 1] is not SKIPPED
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skipping)
    stats = evaluate(loader, model, torch.device("cpu"))
    assert stats["num_images"] == len(samples) - 1 and stats["num_skipped"] == 1

    # Oracle: the same evaluation over the readable images only.
    readable = ImageListDataset(str(data / "val"), [s for i, s in enumerate(samples) if i != bad], transform)
    ref = evaluate(torch.utils.data.DataLoader(readable, batch_size=4), model, torch.device("cpu"))
    assert ref["num_images"] == stats["num_images"]
    assert ref["acc1"] == stats["acc1"] and ref["acc5"] == stats["acc5"]
    assert ref["loss"] == pytest.approx(stats["loss"], rel=1e-6)


# ------------------------------------------------------------------------------------ 6. errors as promised
def _no_traceback(capsys) -> str:
    err = capsys.readouterr().err
    assert "ERROR:" in err and "Traceback" not in err
    return err


def test_resume_wrong_model_or_truncated_file_exits_2(cls_main, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "1")) == 0
    ckpt = out / "checkpoint-0.pth"
    other = [a if a != "unified_convnext_micro" else "unified_pvt_micro" for a in FAST_ARGS]
    capsys.readouterr()
    assert cls_main.main([*other, "--data_path", str(tiny_dataset), "--eval", "true", "--resume", str(ckpt)]) == 2
    assert "does not fit the model unified_pvt_micro" in _no_traceback(capsys)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    for resume in (truncated, tmp_path / "missing.pth"):
        assert cls_main.main([*FAST_ARGS, "--data_path", str(tiny_dataset), "--eval", "true", "--resume",
                              str(resume)]) == 2
        assert str(resume) in _no_traceback(capsys)


def test_nonfinite_checkpoint_is_reported(cls_main, tiny_dataset, tmp_path, capsys):
    state = _micro_state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    path = tmp_path / "nan.pth"
    torch.save({"model": state}, path)
    assert cls_main.main([*FAST_ARGS, "--data_path", str(tiny_dataset), "--eval", "true", "--resume", str(path)]) == 2
    err = _no_traceback(capsys)
    assert "non-finite" in err and key in err


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--update_freq", "0"), ("--input_size", "-3"),
                                         ("--epochs", "0")])
def test_nonpositive_numbers_exit_2(cls_main, tiny_dataset, flag, value, capsys):
    assert cls_main.main([*FAST_ARGS, "--data_path", str(tiny_dataset), flag, value]) == 2
    assert f"{flag} must be >=" in _no_traceback(capsys)


def test_unusable_input_size_fails_before_training_with_sizes_that_work(cls_main, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a if a != "unified_convnext_micro" else "unified_swin_micro" for a in FAST_ARGS]
    argv[argv.index("--input_size") + 1] = "100"
    assert cls_main.main([*argv, "--data_path", str(tiny_dataset), "--output_dir", str(out)]) == 2
    err = _no_traceback(capsys)
    assert "--input_size 100 does not work with unified_swin_micro" in err
    assert "built for 100x100 inputs, got 100x100" not in err  # the old self-contradicting message
    assert "96" in err and "128" in err  # the nearest sizes that work, from the block's own rule
    assert not (out / "log.txt").exists()  # nothing started


def test_full_disk_is_named_and_loses_nothing(cls_main, tiny_dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "1")) == 0
    saved = {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".pth")}
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert cls_main.main(_train_args(tiny_dataset, out, "--epochs", "2")) == 2
    monkeypatch.setattr(torch, "save", real_save)
    err = _no_traceback(capsys)
    assert "the disk is full" in err and "checkpoint-1.pth" in err
    assert {n: (out / n).read_bytes() for n in os.listdir(out) if n.endswith(".pth")} == saved
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
