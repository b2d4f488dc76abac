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
    ("missing_ann_id", r"annotations\[0\]: has no 'id'"),
    ("duplicate_ann_id", r"annotations\[1\]: duplicate id 1 \(also the id of annotations\[0\]\)"),
    ("duplicate_image_id", r"images\[1\] \(b.png\): duplicate id 1 \(also the id of images\[0\], a.png\)"),
    ("size_mismatch", r"image sizes differ.*\n  a.png \(id 1\): the json says height 40 width 40, the file is 30 x 40"),
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
    elif case == "missing_ann_id":
        del ann["annotations"][0]["id"]
    elif case == "duplicate_ann_id":
        ann["annotations"].append(dict(ann["annotations"][0]))
    elif case == "duplicate_image_id":
        ann["images"].append(dict(ann["images"][0], file_name="b.png"))
    elif case == "size_mismatch":
        ann["images"][0]["height"] = 40
    if case not in ("no_json", "no_root", "bad_json", "list_top", "missing_image_file"):
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


def _set_with_a_truncated_image(tmp_path, num_images=3, bad=(1,)):
    """`num_images` noise PNGs of 64x48 with one box each; the images in `bad` are cut in half (the header
    is intact, so the size check passes, but decoding fails as for a partly copied file)."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i in range(num_images):
        path = root / f"{i}.png"
        Image.fromarray(rng.randint(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        if i in bad:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 48, "width": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 16], "area": 320,
                            "iscrowd": 0, "segmentation": [[4, 4, 24, 4, 24, 20, 4, 20]]})
    json_file = tmp_path / "ann.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                     "categories": [{"id": 1, "name": "thing"}]}))
    return str(json_file), str(root)


def test_truncated_training_image_is_skipped_and_named(tmp_path, caplog, monkeypatch):
    """detectron2's train loader with the app's mapper: the truncated image never reaches a batch, a
    warning names it once, and the other images keep coming (MapDataset draws a replacement)."""
    import logging

    monkeypatch.setattr(logging.getLogger("stm_det"), "propagate", True)  # in case train_net set it up here

    from stm_det.trainer import Trainer

    json_file, root = _set_with_a_truncated_image(tmp_path)
    D.register_coco("det_test_truncated", json_file, root)
    cfg = load_cfg(DEMO_CONFIG, ["DATASETS.TRAIN", '("det_test_truncated",)', "DATALOADER.NUM_WORKERS", "0",
                                 "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(48,)"])
    with caplog.at_level(logging.WARNING, logger="stm_det.data"):
        loader = iter(Trainer.build_train_loader(cfg))
        seen = [d["file_name"] for _ in range(6) for d in next(loader)]
    bad = os.path.join(root, "1.png")
    assert len(seen) == 12 and bad not in seen and set(seen) == {os.path.join(root, f"{i}.png") for i in (0, 2)}
    named = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert len(named) == 1 and "Skipping unreadable training image" in named[0], named


def test_too_many_bad_images_stop_with_a_list(tmp_path):
    from detectron2.data import DatasetMapper

    json_file, root = _set_with_a_truncated_image(tmp_path, bad=(0, 1))
    D.register_coco("det_test_two_bad", json_file, root)
    cfg = load_cfg(DEMO_CONFIG, ["INPUT.MIN_SIZE_TRAIN", "(48,)"])
    from detectron2.data import DatasetCatalog

    dicts = DatasetCatalog.get("det_test_two_bad")
    mapper = D.SkipBadImages(DatasetMapper(cfg, is_train=True), max_bad=1)
    assert mapper(dicts[0]) is None
    assert mapper(dicts[0]) is None  # the same file again does not count twice
    assert mapper(dicts[2])["image"].shape[1:] == (48, 64)
    with pytest.raises(D.TooManyBadImages, match=r"2 training image\(s\) could not be read, more than "
                       r"DATALOADER.MAX_BAD_IMAGES = 1:\n  .*0.png: OSError.*\n  .*1.png: OSError"):
        mapper(dicts[1])


def test_train_net_bad_image_cap_is_a_clear_error(tmp_path):
    """With DATALOADER.MAX_BAD_IMAGES 0 the first unreadable image ends training: ERROR naming it, exit 2."""
    json_file, root = _set_with_a_truncated_image(tmp_path, num_images=2, bad=(0, 1))
    proc = run_train_net(["--config-file", DEMO_CONFIG, "--register-coco", "mine", json_file, root,
                          "DATASETS.TRAIN", '("mine",)', "DATASETS.TEST", "()", "DATALOADER.NUM_WORKERS", "0",
                          "DATALOADER.MAX_BAD_IMAGES", "0", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TRAIN", "(48,)",
                          "OUTPUT_DIR", str(tmp_path / "out")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "ERROR: 1 training image(s) could not be read, more than DATALOADER.MAX_BAD_IMAGES = 0" in proc.stderr
    assert os.path.join(root, "") in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def _train_net_module():
    import importlib.util

    from det_test_utils import TRAIN_NET

    spec = importlib.util.spec_from_file_location("stm_det_train_net", TRAIN_NET)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    return train_net


@pytest.mark.parametrize("case", ["no_config", "unknown_model", "bad_key"])
def test_train_net_usage_errors(tmp_path, capsys, case):
    """Mistakes in the command line end with `ERROR: ...` and exit 2, before the config dump or any output
    (train_net.main in this process, as launch() calls it with one GPU or on the CPU)."""
    out = tmp_path / "out"
    args = ["--config-file", str(DEMO_CONFIG), "OUTPUT_DIR", str(out)]
    if case == "no_config":
        args[1] = str(tmp_path / "nope.yaml")
        expected = f"ERROR: --config-file {tmp_path / 'nope.yaml'}: file not found"
    elif case == "unknown_model":
        args += ["MODEL.UNIFIED.NAME", "unified_convnxt_micro"]
        expected = ("ERROR: MODEL.UNIFIED.NAME 'unified_convnxt_micro' is not a registered model; "
                    "did you mean unified_convnext_micro")
    else:
        args += ["MODEL.UNIFIED.NAMES", "x"]
        expected = "with the command-line options: Non-existent key: MODEL.UNIFIED.NAMES"
    train_net = _train_net_module()
    with pytest.raises(SystemExit) as e:
        train_net.main(train_net.argument_parser().parse_args(args))
    assert e.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and expected in errors[0], captured.err[-3000:]
    assert "Running with full config" not in captured.out + captured.err
    assert not out.exists()


@pytest.mark.parametrize("with_masks", [False, True])
def test_evaluator_follows_the_dataset(tmp_path, with_masks):
    """A set registered without segmentations is evaluated on boxes only (a Mask R-CNN config still
    predicts masks); one with masks on bbox + segm. Predictions equal to the ground truth score AP 100."""
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    from stm_det.trainer import build_evaluator

    json_file, root = _tiny_coco(tmp_path)
    ann = json.loads(open(json_file).read())
    if not with_masks:
        for a in ann["annotations"]:
            del a["segmentation"]
    open(json_file, "w").write(json.dumps(ann))
    name = f"det_test_eval_{with_masks}"
    D.register_coco(name, json_file, root)
    cfg = load_cfg(BASE_CONFIG, ["OUTPUT_DIR", str(tmp_path / "out")])
    assert cfg.MODEL.MASK_ON
    evaluator = build_evaluator(cfg, name)
    evaluator.reset()
    x, y, w, h = ann["annotations"][0]["bbox"]
    inst = Instances((30, 40))
    inst.pred_boxes = Boxes(torch.tensor([BoxMode.convert([x, y, w, h], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])  # category id 7 -> contiguous 0
    mask = torch.zeros(1, 30, 40, dtype=torch.bool)
    mask[0, 2:10, 1:11] = True  # the polygon [1, 2, 11, 2, 11, 10, 1, 10] as pixels
    inst.pred_masks = mask
    evaluator.process([{"image_id": 1, "file_name": "a.png"}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert set(results) == ({"bbox", "segm"} if with_masks else {"bbox"})
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_unknown_evaluator_type_is_named(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from stm_det.trainer import build_evaluator

    DatasetCatalog.register("det_test_semseg", lambda: [])
    MetadataCatalog.get("det_test_semseg").set(evaluator_type="sem_seg")
    cfg = load_cfg(BASE_CONFIG, ["OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(D.DatasetError, match="'det_test_semseg' has evaluator_type 'sem_seg'"):
        build_evaluator(cfg, "det_test_semseg")
