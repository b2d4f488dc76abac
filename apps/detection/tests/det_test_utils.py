"""Helpers shared by the detection app tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import stm_backbones

APP_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR = APP_DIR / "configs"
TRAIN_NET = APP_DIR / "train_net.py"
BASE_CONFIG = CONFIGS_DIR / "Base-Unified-MaskRCNN-FPN-1x.yaml"
DEMO_CONFIG = CONFIGS_DIR / "demo_shapes_unified_convnext_micro.yaml"
# From the registry, never written out: every registered mixer family (its smallest model for the backbone and
# optimizer tests), and the configs that generate.py writes (every size of the study's mixers).
FAMILIES = tuple(stm_backbones.list_families())
MIXERS = tuple(f.name for f in FAMILIES)
SMALLEST = tuple(f.smallest for f in FAMILIES)
STUDY_CONFIGS = tuple((f.name, size) for f in stm_backbones.list_families(study=True) for size in f.sizes)

# Shrinks a config so that a model runs in well under a second on a small CPU image.
SMALL_OVERRIDES = [
    "MODEL.DEVICE", "cpu",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.UNIFIED.PRETRAINED", "",
]


def config_path(mixer: str, size: str) -> Path:
    return CONFIGS_DIR / f"mask_rcnn_unified_{mixer}_{size}_fpn_1x_coco.yaml"


def load_cfg(path, opts=()):
    from detectron2.config import get_cfg

    from stm_det import add_unified_config

    cfg = get_cfg()
    add_unified_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(list(opts))
    return cfg


def run_train_net(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    """Run train_net.py in a subprocess (one intra-op thread); returns the completed process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(TRAIN_NET), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def half_writing_save(stop):
    """A stand-in for torch.save that writes the first half of the real bytes to the file, then calls
    `stop()` (raise, or os._exit as a kill would): a write stopped at an exact moment, without timing."""
    import io

    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        stop()

    return save
