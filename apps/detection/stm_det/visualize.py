"""Draw a model's predictions (boxes, classes, scores, masks) on a few images of a dataset."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

logger = logging.getLogger(__name__)


@torch.no_grad()
def visualize_predictions(cfg, model, dataset_name: str, num_images: int, output_path: str,
                          score_thresh: float = 0.5) -> str | None:
    """Run `model` on the first `num_images` images of `dataset_name` (the test-time resize of `cfg`)
    and write a PNG with the predictions drawn by detectron2's Visualizer (one row, ground truth
    above, predictions below). Returns the path, or None if the dataset is empty."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    dicts = DatasetCatalog.get(dataset_name)[:num_images]
    if not dicts:
        return None
    metadata = MetadataCatalog.get(dataset_name)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    was_training = model.training
    model.eval()
    columns = []
    try:
        for d in dicts:
            rgb = read_image(d["file_name"], format="RGB")
            image = rgb if cfg.INPUT.FORMAT == "RGB" else rgb[:, :, ::-1]
            h, w = image.shape[:2]
            tensor = torch.as_tensor(resize.get_transform(image).apply_image(image).astype("float32").transpose(2, 0, 1))
            instances = model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")
            instances = instances[instances.scores >= score_thresh]
            gt = Visualizer(rgb, metadata, scale=2.0).draw_dataset_dict(d).get_image()
            pred = Visualizer(rgb, metadata, scale=2.0, instance_mode=ColorMode.IMAGE).draw_instance_predictions(
                instances).get_image()
            columns.append(np.concatenate([gt, pred], axis=0))
    finally:
        model.train(was_training)
    height = max(c.shape[0] for c in columns)
    grid = np.concatenate([np.pad(c, ((0, height - c.shape[0]), (0, 4), (0, 0))) for c in columns], axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    from PIL import Image

    Image.fromarray(grid).save(output_path)
    logger.info("Wrote predictions on %d images of %s to %s", len(columns), dataset_name, output_path)
    return output_path
