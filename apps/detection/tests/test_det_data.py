"""Datasets: COCO json validation (clear errors before training), --register-coco, the NUM_CLASSES
check, and the generated shapes set (deterministic, atomic, valid COCO)."""

from __future__ import annotations

import json
import os

import pytest
from det_test_utils import BASE_CONFIG, DEMO_CONFIG, load_cfg, run_train_net

from stm_det import data as D


def _tiny_coco(tmp_path, **overrides):
    """A valid 1-image COCO set; `overrides` replace top-level keys of the json."""
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    Image.new("RGB", (40, 30)).save(root / "a.png")
    ann = {
        "images": [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 8], "area": 80, "iscrowd": 0,
                         "segmentation": [[1, 2, 11, 2, 11, 10, 1, 10]]}],
        "categories": [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}],
    }
    ann.update(overrides)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(ann))
    return str(path), str(root)


def test_valid_set_passes(tmp_path):
    json_file, root = _tiny_coco(tmp_path)
    data = D.validate_coco_json(json_file, root)
    assert D.coco_category_metadata(data) == {"thing_classes": ["thing", "other"],
                                              "thing_dataset_id_to_contiguous_id": {7: 0, 9: 1}}


@pytest.mark.parametrize("case,pattern", [
    ("no_json", "annotation file not found"),
    ("no_root", "image folder not found"),
    ("bad_json", "not a valid JSON file"),
    ("list_top", "top level is a list"),
    ("no_images_key", "missing or non-list key 'images'"),
    ("bad_category", r"annotations\[0\]: category_id 3 is not in categories"),
    ("bad_image_id", r"annotations\[0\]: image_id 5 is not the id of any image"),
    ("bad_bbox", r"annotations\[0\]: bbox must be"),
    ("bad_segmentation", r"annotations\[0\]: segmentation must be"),
    ("bad_image", r"images\[0\] \(a.png\): needs positive integer 'height' and 'width'"),
    ("missing_image_file", "1 of 1 images are missing under"),
])
def test_validation_errors(tmp_path, case, pattern):
    json_file, root = _tiny_coco(tmp_path)
    ann = json.loads(open(json_file).read())
    if case == "no_json":
        json_file = str(tmp_path / "nope.json")
    elif case == "no_root":
        root = str(tmp_path / "no_such_dir")
    elif case == "bad_json":
        open(json_file, "w").write('{"images": [')
    elif case == "list_top":
        open(json_file, "w").write("[]")
    elif case == "no_images_key":
        del ann["images"]
    elif case == "bad_category":
        ann["annotations"][0]["category_id"] = 3
    elif case == "bad_image_id":
        ann["annotations"][0]["image_id"] = 5
    elif case == "bad_bbox":
        ann["annotations"][0]["bbox"] = [1, 2, 3]
    elif case == "bad_segmentation":
        ann["annotations"][0]["segmentation"] = "polygon"
    elif case == "bad_image":
        ann["images"][0]["height"] = 0
    elif case == "missing_image_file":
        os.remove(os.path.join(root, "a.png"))
    if case in ("no_images_key", "bad_category", "bad_image_id", "bad_bbox", "bad_segmentation", "bad_image"):
        open(json_file, "w").write(json.dumps(ann))
    with pytest.raises(D.DatasetError, match=pattern) as e:
        D.validate_coco_json(json_file, root)
    named = json_file if case != "no_root" else root
    assert named in str(e.value)


def test_register_and_num_classes(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    json_file, root = _tiny_coco(tmp_path)
    cfg = load_cfg(BASE_CONFIG, ["DATASETS.TRAIN", '("det_test_tiny",)', "DATASETS.TEST", '("det_test_tiny",)'])
    registered = D.prepare_datasets(cfg, [("det_test_tiny", json_file, root)])
    assert registered == {"det_test_tiny": 2}
    assert MetadataCatalog.get("det_test_tiny").thing_classes == ["thing", "other"]
    dicts = DatasetCatalog.get("det_test_tiny")
    assert len(dicts) == 1 and dicts[0]["annotations"][0]["category_id"] == 0
    # Same files again: fine. Same name with other files: error.
    assert D.register_coco("det_test_tiny", json_file, root) == 2
    (tmp_path / "other").mkdir()
    other_json, other_root = _tiny_coco(tmp_path / "other")
    with pytest.raises(D.DatasetError, match="already registered"):
        D.register_coco("det_test_tiny", other_json, other_root)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1
    with pytest.raises(D.DatasetError, match="has 2 categories but MODEL.ROI_HEADS.NUM_CLASSES is 1"):
        D.check_num_classes(cfg)
    # A name that nobody registered.
    cfg = load_cfg(BASE_CONFIG, ["DATASETS.TRAIN", '("det_test_unknown",)'])
    with pytest.raises(D.DatasetError, match="'det_test_unknown'.*not registered.*--register-coco"):
        D.prepare_datasets(cfg)


def test_builtin_coco_missing_files_error(tmp_path, monkeypatch):
    cfg = load_cfg(BASE_CONFIG)  # coco_2017_train / val under $DETECTRON2_DATASETS (unlikely to exist here)
    from detectron2.data import MetadataCatalog

    if os.path.exists(MetadataCatalog.get("coco_2017_train").json_file):
        pytest.skip("COCO is installed here")
    with pytest.raises(D.DatasetError, match="'coco_2017_train': json_file .* not found .*DETECTRON2_DATASETS"):
        D.prepare_datasets(cfg)


def test_shapes_dataset(shapes_root, tmp_path, monkeypatch):
    assert shapes_root == os.path.join(os.environ["STM_CACHE"], "shapes_coco")
    assert not [n for n in os.listdir(os.path.dirname(shapes_root)) if n.startswith(".shapes_coco.tmp")]
    for split, (num_images, _) in D.SHAPES_SPLITS.items():
        data = D.validate_coco_json(os.path.join(shapes_root, f"{split}.json"), shapes_root)
        assert len(data["images"]) == num_images
        assert [c["name"] for c in data["categories"]] == list(D.SHAPES_CLASSES)
        assert len(data["annotations"]) >= num_images
        assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3}
    # Deterministic: a second cache gets byte-identical annotations.
    monkeypatch.setenv("STM_CACHE", str(tmp_path))
    other = D.ensure_shapes_dataset()
    assert other != shapes_root
    for split in D.SHAPES_SPLITS:
        with open(os.path.join(other, f"{split}.json"), "rb") as a, \
                open(os.path.join(shapes_root, f"{split}.json"), "rb") as b:
            assert a.read() == b.read()
    # Complete caches are reused, stale ones rebuilt.
    mtime = os.path.getmtime(os.path.join(other, "train.json"))
    assert D.ensure_shapes_dataset() == other and os.path.getmtime(os.path.join(other, "train.json")) == mtime
    with open(os.path.join(other, "VERSION"), "w") as f:
        f.write("0\n")
    D.ensure_shapes_dataset()
    assert open(os.path.join(other, "VERSION")).read().strip() == D.SHAPES_VERSION


def test_demo_config_registers_shapes(shapes_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    cfg = load_cfg(DEMO_CONFIG)
    assert D.prepare_datasets(cfg) == {}
    assert MetadataCatalog.get("stm_shapes_val").thing_classes == list(D.SHAPES_CLASSES)
    dicts = DatasetCatalog.get("stm_shapes_val")
    assert len(dicts) == D.SHAPES_SPLITS["val"][0] and dicts[0]["annotations"][0]["segmentation"]


@pytest.mark.parametrize("case", ["bad_path", "malformed_json", "too_many_classes"])
def test_train_net_register_coco_errors(tmp_path, case):
    """train_net.py stops with a clear message before building anything."""
    json_file, root = _tiny_coco(tmp_path)
    opts = ["DATASETS.TRAIN", '("mine",)', "DATASETS.TEST", '("mine",)', "OUTPUT_DIR", str(tmp_path / "out")]
    if case == "bad_path":
        json_file = str(tmp_path / "missing" / "ann.json")
        expected = f"{json_file}: annotation file not found"
    elif case == "malformed_json":
        open(json_file, "w").write('{"images": [], "annotations": {}, "categories": []')
        expected = f"{json_file}: not a valid JSON file"
    else:
        opts += ["MODEL.ROI_HEADS.NUM_CLASSES", "1"]
        expected = "has 2 categories but MODEL.ROI_HEADS.NUM_CLASSES is 1"
    proc = run_train_net(["--config-file", DEMO_CONFIG, "--register-coco", "mine", json_file, root, *opts],
                         cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "last_checkpoint").exists()


def test_train_net_setup_sets_num_classes_from_registered_json(tmp_path):
    """With every training set from --register-coco, NUM_CLASSES follows the json unless given."""
    import importlib.util

    from det_test_utils import TRAIN_NET

    spec = importlib.util.spec_from_file_location("stm_det_train_net", TRAIN_NET)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    json_file, root = _tiny_coco(tmp_path)
    base = ["--config-file", str(BASE_CONFIG), "--register-coco", "det_test_auto", json_file, root,
            "DATASETS.TRAIN", '("det_test_auto",)', "DATASETS.TEST", '("det_test_auto",)', "MODEL.DEVICE", "cpu"]
    args = train_net.argument_parser().parse_args([*base, "OUTPUT_DIR", str(tmp_path / "a")])
    assert train_net.setup(args).MODEL.ROI_HEADS.NUM_CLASSES == 2
    args = train_net.argument_parser().parse_args(
        [*base, "OUTPUT_DIR", str(tmp_path / "b"), "MODEL.ROI_HEADS.NUM_CLASSES", "5"])
    assert train_net.setup(args).MODEL.ROI_HEADS.NUM_CLASSES == 5
