"""End to end: train + evaluate + checkpoints + resume on a tiny generated ImageNet-layout dataset."""

from __future__ import annotations

import re

import torch
from cls_test_utils import FAST_ARGS, NO_AUG_ARGS, NUM_CLASSES, read_log, write_folder_dataset

import stm_backbones
from stm_cls.checkpoint import load_file

LOG_KEYS = {"train_loss", "train_lr", "train_min_lr", "train_weight_decay", "train_grad_norm", "test_acc1",
            "test_acc5", "test_loss", "test_acc1_ema", "test_acc5_ema", "test_loss_ema", "epoch", "n_parameters"}


def printed_acc1(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"\* Acc@1 ([0-9.]+)", text)]


def test_train_eval_resume_end_to_end(cls_main, tiny_dataset, tmp_path, capsys):
    out, tb = tmp_path / "out", tmp_path / "tb"
    # The recipe's augmentation (RandAugment, mixup/cutmix, erasing), bf16 autocast, accumulation and layer decay.
    argv = [*FAST_ARGS, "--data_path", tiny_dataset, "--output_dir", out, "--log_dir", tb, "--epochs", "2",
            "--use_amp", "true", "--update_freq", "2", "--batch_size", "4", "--layer_decay", "0.9",
            "--save_ckpt_num", "1"]
    assert cls_main.main(list(map(str, argv))) == 0
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert LOG_KEYS <= set(log[0]), LOG_KEYS - set(log[0])
    assert log[0]["n_parameters"] > 1e6
    assert log[1]["test_num_images"] == 15
    # Rolling deletion with --save_ckpt_num 1 keeps only the newest epoch checkpoint.
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-1.pth" in names and "checkpoint-0.pth" not in names, names
    assert "checkpoint-best.pth" in names and "checkpoint-best-ema.pth" in names
    assert "training_curves.png" in names and not any(n.startswith(".") for n in names), names
    assert any(p.name.startswith("events.out.tfevents") for p in tb.iterdir())

    ckpt = load_file(out / "checkpoint-1.pth")
    assert {"model", "optimizer", "epoch", "scaler", "args", "model_ema"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["args"].model == FAST_ARGS[1]
    best = load_file(out / "checkpoint-best.pth")  # a hard link to the best epoch's checkpoint
    assert best["epoch"] == best["best_epochs"]["best"] and best["max_accuracy"] == max(r["test_acc1"] for r in log)
    capsys.readouterr()

    # --eval of the saved checkpoint reproduces the accuracy measured during training (same amp setting).
    argv_eval = [*FAST_ARGS, "--data_path", tiny_dataset, "--eval", "true", "--use_amp", "true",
                 "--batch_size", "4", "--resume", out / "checkpoint-1.pth"]
    assert cls_main.main(list(map(str, argv_eval))) == 0
    acc = printed_acc1(capsys.readouterr().out)
    assert len(acc) == 1 and abs(acc[0] - log[1]["test_acc1"]) < 1e-3, (acc, log[1]["test_acc1"])

    # Auto-resume continues from checkpoint-1 and only trains the missing epoch.
    argv[argv.index("--epochs") + 1] = "3"
    assert cls_main.main(list(map(str, argv))) == 0
    text = capsys.readouterr().out
    assert "Resume checkpoint" in text and "checkpoint-1.pth" in text
    assert [r["epoch"] for r in read_log(out)] == [0, 1, 2]
    assert read_log(out)[:2] == log


def test_class_folder_layout_and_second_family(cls_main, tmp_path, capsys):
    data = write_folder_dataset(tmp_path / "folders", num_classes=3)
    import timm
    from cls_test_utils import SECOND_MODEL

    import stm_cls.models  # noqa: F401  (registers the backbones)

    stm_cls.models.import_backbones()
    model = SECOND_MODEL if timm.is_model(SECOND_MODEL) else "unified_convnext_micro"
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--epochs", "1", "--model", model,
            "--batch_size", "6", "--nb_classes", "1000", "--output_dir", tmp_path / "out"]
    assert cls_main.main(list(map(str, argv))) == 0
    text = capsys.readouterr().out
    assert "class-folder" in text.lower() or "folder layout" in text
    assert "3 classes" in text
    ckpt = load_file(tmp_path / "out" / "checkpoint-0.pth")
    assert ckpt["model"]["head.weight"].shape[0] == 3 != NUM_CLASSES


def test_eval_released_weights_and_finetune(cls_main, tiny_dataset, tmp_path, capsys):
    """A weights-only file (bare or {'model': ...}) evaluates through stm_backbones' loader, and
    --finetune initialises a model with another number of classes (the head is dropped)."""
    import timm

    from stm_cls.models import import_backbones

    import_backbones()
    torch.manual_seed(0)
    model = timm.create_model(FAST_ARGS[1], num_classes=NUM_CLASSES, img_size=32)
    bare, wrapped = tmp_path / "bare.pth", tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), bare)
    torch.save({"model": model.state_dict()}, wrapped)
    accs = []
    for path in (bare, wrapped):
        argv = [*FAST_ARGS, "--data_path", tiny_dataset, "--eval", "true", "--resume", path]
        assert cls_main.main(list(map(str, argv))) == 0
        accs += printed_acc1(capsys.readouterr().out)
    assert len(accs) == 2 and accs[0] == accs[1]

    data = write_folder_dataset(tmp_path / "folders", num_classes=3)
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--epochs", "1", "--finetune", wrapped,
            "--batch_size", "6", "--disable_eval", "true", "--output_dir", tmp_path / "ft"]
    assert cls_main.main(list(map(str, argv))) == 0
    text = capsys.readouterr().out
    assert "Removing key head.weight" in text and "Load state_dict by model_key = model" in text
    tuned = load_file(tmp_path / "ft" / "checkpoint-0.pth")["model"]
    assert tuned["head.weight"].shape[0] == 3
    assert "test_acc1" not in read_log(tmp_path / "ft")[0]


def test_compile_trains_and_saves_plain_keys(cls_main, tiny_dataset, tmp_path):
    """--compile true: the run trains through torch.compile and its checkpoints load into a plain model."""
    out = tmp_path / "compiled"
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", tiny_dataset, "--output_dir", out, "--epochs", "1",
            "--compile", "true", "--model_ema", "false"]
    assert cls_main.main(list(map(str, argv))) == 0
    log = read_log(out)
    assert len(log) == 1 and log[0]["train_loss"] == log[0]["train_loss"]  # finite, not NaN
    state = load_file(out / "checkpoint-0.pth")["model"]
    assert not any(k.startswith("_orig_mod.") or ".module." in k for k in state), list(state)[:3]
    model = stm_backbones.create_model("unified_convnext_micro", num_classes=NUM_CLASSES)
    model.load_state_dict(state)  # strict
