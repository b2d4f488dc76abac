"""The embedded default dataset: written once in the ImageNet layout, and a short run learns it."""

from __future__ import annotations

import os

from cls_test_utils import MODEL, read_log

from stm_cls import digits
from stm_cls.config import DIGITS_DEFAULTS, apply_digits_defaults, explicit_dests


def test_digits_written_once_in_imagenet_layout():
    root = digits.ensure_digits_dataset()
    assert root == os.path.join(os.environ["STM_CACHE"], "digits_imagenet")
    train = open(os.path.join(root, "meta", "train.txt")).read().splitlines()
    val = open(os.path.join(root, "meta", "val.txt")).read().splitlines()
    assert len(train) + len(val) == 1797 and abs(len(val) - 0.2 * 1797) < 10
    rel, label = train[0].split(" ")
    assert os.path.isfile(os.path.join(root, "train", rel)) and 0 <= int(label) < 10
    assert not set(train) & set(val)
    mtime = os.path.getmtime(os.path.join(root, "meta", "train.txt"))
    assert digits.ensure_digits_dataset() == root  # second call reuses the cache
    assert os.path.getmtime(os.path.join(root, "meta", "train.txt")) == mtime
    leftovers = [n for n in os.listdir(os.path.dirname(root)) if n.startswith(".")]
    assert not leftovers, leftovers


def test_digits_defaults_respect_explicit_flags(cls_main):
    argv = ["--model", MODEL, "--epochs", "2", "--lr", "1e-3"]
    args = cls_main.get_args_parser().parse_args(argv)
    apply_digits_defaults(args, explicit_dests(cls_main.get_args_parser, argv))
    assert args.epochs == 2 and args.lr == 1e-3  # given on the command line: kept
    assert args.input_size == DIGITS_DEFAULTS["input_size"] and args.mixup == 0.0  # switched
    assert args.nb_classes == 10 and args.data_path.endswith("digits_imagenet")


def test_digits_default_run_learns(cls_main, tmp_path, capsys):
    out = tmp_path / "digits"
    code = cls_main.main(["--model", MODEL, "--epochs", "2", "--num_workers", "0", "--output_dir", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "[digits defaults]" in text
    log = read_log(out)
    assert len(log) == 2
    assert log[-1]["test_acc1"] > 50.0, log[-1]  # chance is 10%
    assert (out / "training_curves.png").stat().st_size > 0
