"""Datasets of the detection app: COCO-format registration with up-front validation, and the
embedded drawn-shapes set used by the demo config.

* detectron2's builtin COCO splits (``coco_2017_train`` / ``coco_2017_val``, rooted at
  ``$DETECTRON2_DATASETS``, default ``./datasets``) are registered by detectron2 itself.
* :func:`register_coco` registers any COCO-format instances json + image folder under a name, after
  :func:`validate_coco_json` has checked it, so that a broken set fails before training starts.
* ``stm_shapes_train`` / ``stm_shapes_val``: circles, squares and triangles in random colours on
  noisy backgrounds, with polygon masks. Written deterministically once into
  ``${STM_CACHE:-~/.cache/stm}/shapes_coco/`` (atomically: temp folder, then rename).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from stm_backbones.cache import cache_root, ensure_versioned_dir

logger = logging.getLogger(__name__)

SHAPES_DIRNAME = "shapes_coco"
SHAPES_CLASSES = ("circle", "square", "triangle")
SHAPES_SPLITS = {"train": (300, 1000), "val": (50, 2000)}  # split: (number of images, seed)
SHAPES_DATASETS = {f"stm_shapes_{split}": split for split in SHAPES_SPLITS}
# Bump when the written content changes, so that stale caches are rebuilt instead of reused.
SHAPES_VERSION = "1"


class DatasetError(ValueError):
    """A dataset that cannot be used: missing files, malformed annotations, too many classes."""


# --------------------------------------------------------------------------------------------
# Validation of COCO-format instance annotations
# --------------------------------------------------------------------------------------------

def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_coco_json(json_file: str, image_root: str, check_images: bool = True, max_problems: int = 5) -> dict:
    """Check that `json_file` is a usable COCO instances file whose images are under `image_root`.

    Returns the parsed json. Raises :class:`DatasetError` naming the file and the first problems found.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    if not os.path.isfile(json_file):
        raise DatasetError(f"{json_file}: annotation file not found")
    if not os.path.isdir(image_root):
        raise DatasetError(f"{image_root}: image folder not found (images of {json_file})")
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{json_file}: not a valid JSON file ({e})") from None

    def fail(problems: list[str]):
        more = f" (and more; first {max_problems} shown)" if len(problems) >= max_problems else ""
        raise DatasetError(f"{json_file}: malformed COCO annotations{more}:\n  " + "\n  ".join(problems))

    if not isinstance(data, dict):
        fail([f"the top level is a {type(data).__name__}, expected an object with keys "
              "'images', 'annotations' and 'categories'"])
    problems = [f"missing or non-list key {k!r}" for k in ("images", "annotations", "categories")
                if not isinstance(data.get(k), list)]
    if problems:
        fail(problems)

    cat_ids = set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            problems.append(f"categories[{i}]: needs an integer 'id' and a string 'name', got {c!r:.100}")
        elif c["id"] in cat_ids:
            problems.append(f"categories[{i}]: duplicate id {c['id']}")
        else:
            cat_ids.add(c["id"])
        if len(problems) >= max_problems:
            fail(problems)
    if not data["categories"]:
        problems.append("'categories' is empty")

    images, image_index = {}, {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            problems.append(f"images[{i}]: needs an integer 'id' and a string 'file_name', got {im!r:.100}")
        elif not all(_is_int(im.get(k)) and im[k] > 0 for k in ("height", "width")):
            problems.append(f"images[{i}] ({im['file_name']}): needs positive integer 'height' and 'width'")
        elif im["id"] in images:
            problems.append(f"images[{i}] ({im['file_name']}): duplicate id {im['id']} (also the id of "
                            f"images[{image_index[im['id']]}], {images[im['id']]['file_name']})")
        else:
            images[im["id"]] = im
            image_index[im["id"]] = i
        if len(problems) >= max_problems:
            fail(problems)

    ann_ids: dict[int, int] = {}  # id -> index of its first annotation
    for i, a in enumerate(data["annotations"]):
        p = None
        if not isinstance(a, dict):
            p = f"is a {type(a).__name__}, expected an object"
        elif "id" not in a:
            p = "has no 'id' (every annotation needs a unique integer id)"
        elif not _is_int(a["id"]):
            p = f"'id' must be an integer, got {a['id']!r:.40}"
        elif a["id"] in ann_ids:
            p = f"duplicate id {a['id']} (also the id of annotations[{ann_ids[a['id']]}])"
        elif a.get("image_id") not in images:
            p = f"image_id {a.get('image_id')!r} is not the id of any image"
        elif a.get("category_id") not in cat_ids:
            p = f"category_id {a.get('category_id')!r} is not in categories (ids {sorted(cat_ids)[:20]})"
        elif not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4 and all(map(_is_number, a["bbox"]))
                  and a["bbox"][2] >= 0 and a["bbox"][3] >= 0):
            p = f"bbox must be [x, y, width, height] with width, height >= 0, got {a.get('bbox')!r:.80}"
        elif "segmentation" in a:
            seg = a["segmentation"]
            if isinstance(seg, list):
                if not all(isinstance(poly, list) and all(map(_is_number, poly)) for poly in seg):
                    p = "segmentation must be a list of polygons [x1, y1, x2, y2, ...] or an RLE object"
            elif isinstance(seg, dict):
                if "counts" not in seg or not (isinstance(seg.get("size"), list) and len(seg["size"]) == 2):
                    p = "an RLE segmentation needs 'counts' and 'size' [height, width]"
            else:
                p = f"segmentation must be a list of polygons or an RLE object, got {type(seg).__name__}"
        if isinstance(a, dict) and _is_int(a.get("id")):
            ann_ids.setdefault(a["id"], i)
        if p:
            problems.append(f"annotations[{i}]: {p}")
            if len(problems) >= max_problems:
                fail(problems)
    if problems:
        fail(problems)

    if check_images:
        missing = [im["file_name"] for im in images.values()
                   if not os.path.isfile(os.path.join(image_root, im["file_name"]))]
        if missing:
            raise DatasetError(f"{json_file}: {len(missing)} of {len(images)} images are missing under "
                               f"{image_root}, e.g. {', '.join(missing[:3])}")
        check_image_sizes(json_file, image_root, images.values(), max_problems)
    return data


# EXIF orientations that detectron2's read_image (ImageOps.exif_transpose) turns by 90 degrees.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def image_size_from_header(path: str) -> tuple[int, int]:
    """(height, width) of an image as detectron2 will load it, from the file header only (PIL opens
    lazily and decodes no pixels): the stored size, swapped when the EXIF orientation rotates by 90
    degrees. Raises OSError / SyntaxError for a file PIL cannot identify."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # a broken EXIF block: detectron2 ignores it too
            orientation = None
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    return height, width


def check_image_sizes(json_file: str, image_root: str, images: Iterable[dict], max_problems: int = 5) -> None:
    """Every image's real size must match the json's height/width (detectron2 otherwise stops in the
    middle of training with a SizeMismatchError). Only headers are read, so this stays fast on large
    sets. A file whose header cannot be read at all is reported with a warning here and skipped during
    training (see :class:`SkipBadImages`)."""
    mismatched, unreadable = [], []
    for im in images:
        path = os.path.join(image_root, im["file_name"])
        try:
            height, width = image_size_from_header(path)
        except (OSError, SyntaxError) as e:
            unreadable.append(f"{path} ({type(e).__name__}: {e})")
            continue
        if (height, width) != (im["height"], im["width"]):
            mismatched.append(f"{im['file_name']} (id {im['id']}): the json says height {im['height']} width "
                              f"{im['width']}, the file is {height} x {width}")
            if len(mismatched) >= max_problems:
                break
    if unreadable:
        logger.warning("%s: %d image(s) cannot be read and will be skipped in training: %s", json_file,
                       len(unreadable), "; ".join(unreadable[:5]))
    if mismatched:
        more = f" (first {max_problems} shown)" if len(mismatched) >= max_problems else ""
        raise DatasetError(f"{json_file}: image sizes differ from the json's height/width{more}:\n  "
                           + "\n  ".join(mismatched))


def coco_category_metadata(data: dict) -> dict:
    """detectron2's metadata for a COCO json (same as ``load_coco_json`` computes when it loads it)."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return {
        "thing_classes": [c["name"] for c in cats],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(cats)},
    }


def register_coco(name: str, json_file: str, image_root: str, check_images: bool = True) -> int:
    """Validate and register a COCO-format instances set; returns its number of categories.

    Registering the same name again with the same files is a no-op.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if getattr(meta, "json_file", None) == json_file and getattr(meta, "image_root", None) == image_root:
            return len(meta.thing_classes)
        raise DatasetError(f"dataset name {name!r} is already registered (with other files); pick another name")
    data = validate_coco_json(json_file, image_root, check_images=check_images)
    register_coco_instances(name, coco_category_metadata(data), json_file, image_root)
    # Read by the trainer to pick the evaluation tasks: a set without segmentations is evaluated on boxes only.
    MetadataCatalog.get(name).set(has_masks=any(a.get("segmentation") for a in data["annotations"]))
    logger.info("Registered %s: %d images, %d annotations, %d categories (%s)", name, len(data["images"]),
                len(data["annotations"]), len(data["categories"]), json_file)
    return len(data["categories"])


# --------------------------------------------------------------------------------------------
# Corrupt images during training
# --------------------------------------------------------------------------------------------

class TooManyBadImages(DatasetError):
    """More unreadable training images than DATALOADER.MAX_BAD_IMAGES allows."""


class SkipBadImages:
    """Wraps a training mapper (e.g. ``DatasetMapper``): an image that cannot be decoded (truncated,
    corrupt, unreadable) is skipped with a warning naming the file, and detectron2's ``MapDataset``
    draws another sample in its place. More than `max_bad` distinct bad files stop training with
    :class:`TooManyBadImages`, so that a broken dataset is not silently trained on a fraction of
    itself. Counts are per data-loader process (each worker holds its own copy)."""

    def __init__(self, mapper, max_bad: int = 10):
        self.mapper = mapper
        self.max_bad = int(max_bad)
        self.bad_files: dict[str, str] = {}

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL: OSError (truncated, unidentified), SyntaxError (broken PNG)
            file_name = dataset_dict.get("file_name", "<unknown file>")
            if file_name not in self.bad_files:
                self.bad_files[file_name] = f"{type(e).__name__}: {e}"
                logger.warning("Skipping unreadable training image %s (%s: %s); %d bad so far, at most %d allowed "
                               "(DATALOADER.MAX_BAD_IMAGES)", file_name, type(e).__name__, e, len(self.bad_files),
                               self.max_bad)
            if len(self.bad_files) > self.max_bad:
                shown = "\n  ".join(f"{f}: {why}" for f, why in list(self.bad_files.items())[:10])
                raise TooManyBadImages(f"{len(self.bad_files)} training image(s) could not be read, more than "
                                       f"DATALOADER.MAX_BAD_IMAGES = {self.max_bad}:\n  {shown}\nFix or remove them "
                                       "from the annotation file, or raise DATALOADER.MAX_BAD_IMAGES") from None
            return None


# --------------------------------------------------------------------------------------------
# The drawn-shapes set
# --------------------------------------------------------------------------------------------

def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) of a shape inscribed in the circle (cx, cy, r)."""
    n = {"circle": 32, "square": 4, "triangle": 3}[kind]
    t = angle + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _draw_image(rng: np.random.RandomState, height: int, width: int):
    """One image (H, W, 3 uint8 RGB) and its objects [(class index, polygon (K, 2))]."""
    import cv2

    bg = rng.uniform(40, 215, size=3)
    img = np.empty((height, width, 3), np.float32)
    img[:] = bg
    # A smooth random gradient plus pixel noise, so that the background is not trivially flat.
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(-1, 1, size=2)
    img += (direction[0] * xx / width + direction[1] * yy / height)[..., None] * rng.uniform(-40, 40, size=3)
    objects, boxes = [], []
    for _ in range(rng.randint(1, 5)):
        for _attempt in range(20):
            r = rng.uniform(10, min(height, width) / 4.5)
            cx, cy = rng.uniform(r + 1, width - r - 1), rng.uniform(r + 1, height - r - 1)
            box = (cx - r - 2, cy - r - 2, cx + r + 2, cy + r + 2)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                break
        else:
            continue
        cls = rng.randint(len(SHAPES_CLASSES))
        poly = _shape_polygon(SHAPES_CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi))
        while True:  # a colour clearly different from the local background
            colour = rng.uniform(0, 255, size=3)
            if np.abs(colour - img[int(cy), int(cx)]).sum() > 120:
                break
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], colour.tolist(), lineType=cv2.LINE_8)
        objects.append((cls, poly))
        boxes.append(box)
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _write_shapes(root: str) -> None:
    from PIL import Image

    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES_CLASSES)]
    for split, (num_images, seed) in SHAPES_SPLITS.items():
        rng = np.random.RandomState(seed)
        os.makedirs(os.path.join(root, split))
        images, annotations = [], []
        for image_id in range(1, num_images + 1):
            height, width = (int(v) for v in rng.choice([128, 160, 192], size=2))
            img, objects = _draw_image(rng, height, width)
            file_name = f"{split}/{image_id:05d}.png"
            Image.fromarray(img).save(os.path.join(root, file_name))
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            for cls, poly in objects:
                x0, y0 = poly.min(axis=0)
                x1, y1 = poly.max(axis=0)
                xs, ys = poly[:, 0], poly[:, 1]
                area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1, "iscrowd": 0,
                    "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)], "area": round(area, 2),
                    "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                })
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump({"info": {"description": "stm drawn shapes", "version": SHAPES_VERSION}, "images": images,
                       "annotations": annotations, "categories": categories}, f)


def shapes_root() -> str:
    return os.path.join(cache_root(), SHAPES_DIRNAME)


def ensure_shapes_dataset() -> str:
    """Return the root of the shapes set, writing it first if needed (atomic and safe for concurrent
    writers: `stm_backbones.cache.ensure_versioned_dir`)."""
    root, written = ensure_versioned_dir(SHAPES_DIRNAME, SHAPES_VERSION, _write_shapes)
    if written:
        logger.info("Wrote the shapes dataset to %s", root)
    return root


def register_shapes() -> None:
    """Register ``stm_shapes_train`` / ``stm_shapes_val`` (idempotent). The files are written on
    first use of the data (or by :func:`prepare_datasets`)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json

    root = shapes_root()
    for name, split in SHAPES_DATASETS.items():
        if name in DatasetCatalog.list():
            continue
        json_file, image_root = os.path.join(root, f"{split}.json"), root

        def load(json_file=json_file, image_root=image_root, name=name):
            ensure_shapes_dataset()
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            json_file=json_file, image_root=image_root, evaluator_type="coco", has_masks=True,
            thing_classes=list(SHAPES_CLASSES),
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        )


# --------------------------------------------------------------------------------------------
# Everything a run needs before training starts
# --------------------------------------------------------------------------------------------

def parse_register_args(triples: Iterable[Sequence[str]] | None) -> list[tuple[str, str, str]]:
    out = []
    for t in triples or ():
        if len(t) != 3:
            raise DatasetError(f"--register-coco takes NAME JSON IMAGE_ROOT, got {list(t)}")
        out.append((str(t[0]), str(t[1]), str(t[2])))
    return out


def prepare_datasets(cfg, register: Iterable[Sequence[str]] | None = None,
                     names: Iterable[str] | None = None) -> dict[str, int]:
    """Register the user's sets, write the shapes set if the config names it, and check that every
    dataset in `names` (default: DATASETS.TRAIN + DATASETS.TEST) is registered and its files exist.

    Returns {name: number of categories} for the user-registered sets (``register``).
    Raises :class:`DatasetError` with a message naming the dataset/file and the problem.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    register_shapes()
    registered = {}
    for name, json_file, image_root in parse_register_args(register):
        registered[name] = register_coco(name, json_file, image_root)
    if names is None:
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    for name in names:
        if name in SHAPES_DATASETS:
            ensure_shapes_dataset()
            continue
        if name not in DatasetCatalog.list():
            raise DatasetError(f"dataset {name!r} (in DATASETS.TRAIN/TEST) is not registered. Register a COCO-format "
                               "set with --register-coco NAME JSON IMAGE_ROOT, or use a builtin name such as "
                               "coco_2017_train / coco_2017_val (under $DETECTRON2_DATASETS, default ./datasets)")
        meta = MetadataCatalog.get(name)
        for key in ("json_file", "image_root"):
            path = getattr(meta, key, None)
            if path is not None and not os.path.exists(path):
                hint = (" (builtin datasets live under $DETECTRON2_DATASETS, default ./datasets; "
                        f"it is {os.environ.get('DETECTRON2_DATASETS', 'unset')})") if name not in registered else ""
                raise DatasetError(f"dataset {name!r}: {key} {path} not found{hint}")
    return registered


def check_num_classes(cfg, names: Iterable[str] | None = None) -> None:
    """Error if a dataset in `names` (default: DATASETS.TRAIN) has more categories than
    MODEL.ROI_HEADS.NUM_CLASSES."""
    from detectron2.data import MetadataCatalog

    for name in cfg.DATASETS.TRAIN if names is None else names:
        classes = getattr(MetadataCatalog.get(name), "thing_classes", None)
        if classes is not None and len(classes) > cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise DatasetError(f"dataset {name!r} has {len(classes)} categories but MODEL.ROI_HEADS.NUM_CLASSES is "
                               f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}; raise it (e.g. MODEL.ROI_HEADS.NUM_CLASSES "
                               f"{len(classes)})")
