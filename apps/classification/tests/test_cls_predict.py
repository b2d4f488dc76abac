"""predict.py: a checkpoint trained on the digits classifies digit images out of the box; JSON schema, PNG grid,
class names (checkpoint, class folders, ImageNet-1k, --class_names, indices) and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from cls_test_utils import APP_DIR, FAST_ARGS, MAIN_PY, NO_AUG_ARGS, read_log, write_folder_dataset
from PIL import Image

import stm_backbones  # noqa: F401
from stm_cls.digits import ensure_digits_dataset

PREDICT_PY = APP_DIR / "predict.py"
MODEL = "unified_convnext_micro"


def load_script(path: Path, name: str):
    """A script imported as a module (its main(argv) returns the exit code): no subprocess, no second torch import."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predict_main():
    return load_script(PREDICT_PY, "stm_cls_predict_main").main


@pytest.fixture(scope="module")
def train_main():
    return load_script(MAIN_PY, "stm_cls_main_for_predict").main


@pytest.fixture(scope="module")
def digits_run(train_main, tmp_path_factory):
    """One epoch of main.py on the embedded digits (the app's defaults for them), fp32, no EMA."""
    out = tmp_path_factory.mktemp("digits_run")
    argv = ["--model", MODEL, "--epochs", "1", "--use_amp", "false", "--model_ema", "false", "--output_dir", str(out)]
    assert train_main(argv) == 0
    return out


def val_images(root: str) -> list[tuple[str, int]]:
    lines = Path(root, "meta", "val.txt").read_text().split()
    return [(os.path.join(root, "val", rel), int(label)) for rel, label in zip(lines[::2], lines[1::2])]


def check_schema(results: list[dict], k: int, names: list[str] | None = None) -> None:
    for r in results:
        assert set(r) == {"image", "topk"} and isinstance(r["image"], str)
        probs = [t["prob"] for t in r["topk"]]
        assert len(r["topk"]) == k and probs == sorted(probs, reverse=True)  # best first
        assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-5
        for t in r["topk"]:
            assert set(t) == {"class", "index", "prob"} and isinstance(t["index"], int)
            if names is not None:
                assert t["class"] == names[t["index"]]
        assert len({t["index"] for t in r["topk"]}) == k


def test_digits_checkpoint_predicts_digit_images(predict_main, digits_run, tmp_path, capsys):
    root = ensure_digits_dataset()
    images = val_images(root)
    out = tmp_path / "pred"
    val_dir = os.path.join(root, "val")
    code = predict_main(["--model", MODEL, "--checkpoint", str(digits_run / "checkpoint-0.pth"), "--output", str(out),
                         "--topk", "3", val_dir])
    text = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == len(images)
    check_schema(results, 3, [str(i) for i in range(10)])
    assert "names: checkpoint" in text and "top-1" in text
    truth = {os.path.abspath(p): label for p, label in images}
    correct = sum(int(r["topk"][0]["class"]) == truth[os.path.abspath(r["image"])] for r in results)
    # Chance is 10%. The oracle: the same weights evaluated by main.py during training, with the transform
    # recorded in the checkpoint, so the counts agree (one image of slack for a near-tie in another batch).
    logged = read_log(digits_run)[0]["test_acc1"] * len(images) / 100
    assert correct > 0.5 * len(images), correct
    assert abs(correct - logged) <= 1, (correct, logged)
    # The grid: a real PNG, one cell per image up to --grid_max.
    with Image.open(out / "predictions.png") as grid:
        assert grid.format == "PNG" and grid.width > 200 and grid.height > 200
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp files left


def test_inputs_globs_unreadable_and_bad_arguments(predict_main, digits_run, tmp_path, capsys):
    root = ensure_digits_dataset()
    ckpt = str(digits_run / "checkpoint-0.pth")
    src = [p for p, _ in val_images(root)[:3]]
    for p in src:
        shutil.copy(p, tmp_path / os.path.basename(p))
    (tmp_path / "broken.png").write_bytes(Image.open(src[0]).tobytes()[:50])  # not an image file
    good = sorted(str(p) for p in tmp_path.glob("digit_*.png"))
    out = tmp_path / "pred"
    # A glob, a repeated file (counted once), an unreadable file and a path that names nothing:
    # exit 1, both listed on stderr, the readable images still predicted and written.
    code = predict_main(["--checkpoint", ckpt, "--output", str(out), str(tmp_path / "digit_*.png"), good[0],
                         str(tmp_path / "broken.png"), str(tmp_path / "nothing.png"), "--topk", "20"])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.png" in captured.err and "nothing.png" in captured.err and "2 input(s) skipped" in captured.err
    results = json.loads((out / "predictions.json").read_text())
    assert [r["image"] for r in results] == good
    check_schema(results, 10)  # --topk 20 is capped at the 10 classes

    # Bad arguments: ERROR and exit 2, no traceback.
    cases = [
        (["--checkpoint", str(tmp_path / "none.pth"), good[0]], "--checkpoint not found"),
        (["--checkpoint", ckpt, str(tmp_path / "empty_dir_glob_*.png")], "no images found"),
        (["--checkpoint", ckpt], "no images given"),
        (["--checkpoint", ckpt, "--topk", "0", good[0]], "--topk"),
        (["--checkpoint", ckpt, "--model", "unified_pvt_micro", good[0]], "does not fit 'unified_pvt_micro'"),
        (["--checkpoint", ckpt, "--model", "unified_nope_micro", good[0]], "unknown model 'unified_nope_micro'"),
        (["--checkpoint", str(tmp_path / "broken.png"), good[0]], "cannot read checkpoint"),
        (["--checkpoint", ckpt, "--ema", good[0]], "no 'model_ema' entry"),
        (["--checkpoint", ckpt, "--bogus", good[0]], "unrecognized arguments: --bogus"),
    ]
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    cases.append((["--checkpoint", ckpt, "--class_names", str(names), good[0]], "has 2 names, the model 10 classes"))
    for argv, expect in cases:
        try:
            code = predict_main(argv)
        except SystemExit as exc:  # argparse errors exit from inside parse_args
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "ERROR: " in err and expect in err and "Traceback" not in err, (argv, err)


def test_untrusted_checkpoint_is_not_unpickled(predict_main, tmp_path, capsys):
    """predict.py reads weights-only: a pickle that would run code is refused, and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = torch.nn.Linear(2, 2)
    torch.save({"model": model.state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    assert predict_main(["--model", MODEL, "--checkpoint", str(tmp_path / "evil.pth"), str(img)]) == 2
    assert "ERROR: cannot read checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_class_folder_names_from_the_training_run(predict_main, train_main, tmp_path, capsys):
    """A class-per-folder dataset: predictions are labelled with its folder names."""
    data = write_folder_dataset(tmp_path / "data", n_per_class=4, num_classes=3)
    out = tmp_path / "run"
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--epochs", "1", "--output_dir", out, "--model_ema", "false",
            "--batch_size", "4"]
    assert train_main(list(map(str, argv))) == 0
    capsys.readouterr()
    pred = tmp_path / "pred"
    assert predict_main(["--checkpoint", str(out / "checkpoint-0.pth"), "--output", str(pred), "--topk", "3",
                         str(data / "val")]) == 0
    results = json.loads((pred / "predictions.json").read_text())
    assert len(results) == 6
    check_schema(results, 3, ["class_0", "class_1", "class_2"])


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Weights-only files as released (no args): 1000 classes and 7 classes."""
    import timm

    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    for n in (1000, 7):
        torch.save(timm.create_model(MODEL, num_classes=n).state_dict(), root / f"w{n}.pth")
    img = root / "img.png"
    gen = torch.Generator().manual_seed(0)
    Image.fromarray((torch.rand(50, 70, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(img)
    return root


def test_weights_only_files_imagenet_and_index_names(predict_main, released, tmp_path, capsys):
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    imagenet = [info.index_to_description(i) for i in range(1000)]
    out = tmp_path / "in1k"
    assert predict_main(["--model", MODEL, "--checkpoint", str(released / "w1000.pth"), "--output", str(out),
                         "--input_size", "64", str(released / "img.png")]) == 0
    text = capsys.readouterr().out
    # No recorded transform: the model's pretrained_cfg (study: bicubic, crop 0.875), size from --input_size.
    assert "names: ImageNet-1k" in text and "center 64 px, crop_pct 0.875, bicubic" in text, text
    check_schema(json.loads((out / "predictions.json").read_text()), 5, imagenet)

    out = tmp_path / "seven"
    assert predict_main(["--model", MODEL, "--checkpoint", str(released / "w7.pth"), "--output", str(out),
                         "--input_size", "32", str(released / "img.png")]) == 0
    check_schema(json.loads((out / "predictions.json").read_text()), 5, [f"class_{i}" for i in range(7)])
    names = [f"thing {i}" for i in range(7)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    assert predict_main(["--model", MODEL, "--checkpoint", str(released / "w7.pth"), "--output", str(out),
                         "--input_size", "32", "--class_names", str(tmp_path / "names.txt"), "--topk", "2",
                         str(released / "img.png")]) == 0
    check_schema(json.loads((out / "predictions.json").read_text()), 2, names)
    # Without a recorded model name, --model is required.
    assert predict_main(["--checkpoint", str(released / "w7.pth"), str(released / "img.png")]) == 2
    assert "--model is required" in capsys.readouterr().err
