"""Data problems: unreadable images are skipped with a warning; bad layouts/arguments fail clearly."""

from __future__ import annotations

import shutil

import pytest
from cls_test_utils import FAST_ARGS, NO_AUG_ARGS, run_cli, write_list_dataset

from stm_cls.datasets import DatasetError, ImageListDataset, UnreadableDataError, parse_list_file


def _copy(tiny_dataset, tmp_path):
    return shutil.copytree(tiny_dataset, tmp_path / "data")


def test_corrupt_image_is_skipped_with_warning(cls_main, tiny_dataset, tmp_path, capsys):
    data = _copy(tiny_dataset, tmp_path)
    bad = data / "train" / "n00000001" / "img_1_3.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (data / "val" / "val_0004.png").unlink()  # a missing file counts as unreadable too
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--epochs", "1"]
    assert cls_main.main(list(map(str, argv))) == 0
    err = capsys.readouterr().err
    assert f"skipping unreadable image {bad}" in err
    assert "val_0004.png" in err
    assert err.count(str(bad)) == 1  # reported once, not on every read


def test_unreadable_image_limits(tmp_path):
    root = write_list_dataset(tmp_path / "d", n_train_per_class=2, n_val=2)
    samples = [(line.split(" ")[0], int(line.split(" ")[1]))
               for line in (root / "meta" / "train.txt").read_text().splitlines()]
    for rel, _ in samples[:3]:
        (root / "train" / rel).write_bytes(b"garbage")
    ds = ImageListDataset(str(root / "train"), samples, max_failed=3)
    assert ds[0][1] == samples[3][1]  # substitutes the next readable sample
    assert ds[1][1] == samples[3][1]  # known-bad files still resolve, and are not counted twice
    with pytest.raises(UnreadableDataError, match="more than --max_failed_images=2"):
        ImageListDataset(str(root / "train"), samples, max_failed=2)[0]
    for rel, _ in samples:
        (root / "train" / rel).write_bytes(b"garbage")
    with pytest.raises(UnreadableDataError, match="unreadable"):
        ImageListDataset(str(root / "train"), samples, max_failed=-1)[0]


def test_list_file_errors_name_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a.jpg 0\nb c.jpg 1\n")
    with pytest.raises(DatasetError, match=r"train.txt:2: malformed line"):
        parse_list_file(str(path), 10)
    path.write_text("a.jpg 0\nb.jpg x\n")
    with pytest.raises(DatasetError, match=r"train.txt:2: label 'x' is not an integer"):
        parse_list_file(str(path), 10)
    path.write_text("a.jpg 0\n\nb.jpg 12\n")
    with pytest.raises(DatasetError, match=r"train.txt:3: label 12 is outside \[0, 10\)"):
        parse_list_file(str(path), 10)


@pytest.mark.parametrize("case", ["missing_dir", "missing_list", "label_out_of_range", "unknown_model"])
def test_bad_arguments_fail_before_training(cls_main, tiny_dataset, tmp_path, capsys, case):
    data = _copy(tiny_dataset, tmp_path)
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", data, "--epochs", "1", "--output_dir", tmp_path / "out"]
    if case == "missing_dir":
        argv[argv.index("--data_path") + 1] = tmp_path / "nowhere"
        expect = f"--data_path directory not found: {tmp_path / 'nowhere'}"
    elif case == "missing_list":
        (data / "meta" / "val.txt").unlink()
        expect = f"list file not found: {data / 'meta' / 'val.txt'}"
    elif case == "label_out_of_range":
        argv[argv.index("--nb_classes") + 1] = "3"
        expect = "train.txt:25: label 3 is outside [0, 3)"
    else:
        argv[argv.index("--model") + 1] = "unified_nonexistent_micro"
        expect = "unknown model 'unified_nonexistent_micro'. Available study models: "
    assert cls_main.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert expect in err, err
    if case == "unknown_model":
        assert "unified_convnext_micro" in err
    assert not (tmp_path / "out" / "log.txt").exists()


def test_cli_exit_codes(tmp_path):
    proc = run_cli(["--data_path", tmp_path / "missing", "--model", "unified_convnext_micro"], timeout=120)
    assert proc.returncode == 2 and "ERROR: --data_path directory not found" in proc.stderr
    proc = run_cli(["--use_amp", "maybe"], timeout=60)
    assert proc.returncode == 2 and "expected a boolean" in proc.stderr
    help_text = run_cli(["--help"], timeout=60).stdout
    for flag in ("--update_freq", "--model_ema_force_cpu", "--warmup_steps", "--mixup_switch_prob", "--dist_on_itp",
                 "--max_failed_images", "--amp_dtype", "--compile", "digits"):
        assert flag in help_text
