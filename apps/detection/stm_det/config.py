"""Config keys of the detection app, added to a detectron2 CfgNode by :func:`add_unified_config`.

Everything else (RPN/ROI heads, FPN, input, solver schedule) uses detectron2's own keys; see
``configs/Base-Unified-MaskRCNN-FPN-1x.yaml`` for the values of the study's Mask R-CNN 1x recipe.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN


class ConfigError(ValueError):
    """A mistake in a config or its command-line overrides; the apps print it as `ERROR: ...` (exit 2)."""


def check_model_name(name: str) -> None:
    """MODEL.UNIFIED.NAME (or a LazyConfig's ``bottom_up.name``) must be a model of
    ``stm_backbones.list_models()``; the error names the closest ones."""
    import difflib

    import stm_backbones

    available = stm_backbones.list_models()
    if name not in available:
        close = difflib.get_close_matches(str(name), available, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"MODEL.UNIFIED.NAME {name!r} is not a registered model; {hint}"
                          f"available: {', '.join(available)}")

# Weight decay 0 (besides the position tables that the backbone's mixer family declares, see
# SOLVER.NO_DECAY_POSITION_TABLES) for parameters whose full name (e.g.
# "backbone.bottom_up.body.stages.0.0.norm1.weight") contains one of these substrings: "norm" catches every
# LayerNorm of the trunks (norm1/norm2, dw_norm, pw_norm, out_norm_*, PVT attn.norm, DCNv3 dw_conv.1.norm).
# The position tables come from the family (`MetaArch.position_tables()`: PVT's pos_embed, the Halo
# attn.pos_embed.height_rel / width_rel tables, the Swin relative_position_bias_table), so a new mixer's
# tables need no entry here.
DEFAULT_NO_DECAY_KEYS = ("norm",)
# The study's mmdet config (paramwise custom_keys), which leaves PVT pos_embed and the Halo tables decayed.
# SOLVER.NO_DECAY_KEYS set to this with SOLVER.NO_DECAY_POSITION_TABLES False reproduces it exactly.
STUDY_MMDET_NO_DECAY_KEYS = ("absolute_pos_embed", "relative_position_bias_table", "norm")


def add_unified_config(cfg: CN) -> None:
    """Add the keys of the unified backbones and of the AdamW solver to a detectron2 config."""
    cfg.MODEL.UNIFIED = CN()
    # Any name of stm_backbones.list_models(), e.g. "unified_swin_tiny".
    cfg.MODEL.UNIFIED.NAME = "unified_convnext_micro"
    # Stages whose (out-normalised) outputs are returned, and the names they get; the FPN reads
    # MODEL.FPN.IN_FEATURES from these names.
    cfg.MODEL.UNIFIED.OUT_INDICES = (0, 1, 2, 3)
    cfg.MODEL.UNIFIED.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth. None: the study's per-size detection value (micro .1, tiny .2, small .2, base .3).
    cfg.MODEL.UNIFIED.DROP_PATH_RATE = None
    # Classification checkpoint loaded into the trunk when the backbone is built (head, conv_head
    # and stage norms dropped, out norms left fresh). MODEL.WEIGHTS, loaded afterwards by the
    # checkpointer, overrides it; a resumed run ignores both and reads its last checkpoint.
    cfg.MODEL.UNIFIED.PRETRAINED = ""
    # Initial layer-scale (gamma) value of every block; None keeps the models' 1e-6. A pretrained
    # checkpoint overwrites it, so it only matters when training from scratch (the demo uses 0.1: with
    # 1e-6 the blocks stay near identity for hundreds of iterations).
    cfg.MODEL.UNIFIED.LAYER_SCALE_INIT_VALUE = None
    # torch.compile the trunk (in place: parameter names and checkpoints are unchanged).
    cfg.MODEL.UNIFIED.COMPILE = False

    # "ADAMW" (the recipe) or "SGD" (detectron2's default optimizer, with SOLVER.MOMENTUM).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BETAS = (0.9, 0.999)
    cfg.SOLVER.EPS = 1e-8
    cfg.SOLVER.NO_DECAY_KEYS = list(DEFAULT_NO_DECAY_KEYS)
    # No decay for the position tables of the backbone's mixer family (`position_tables()` of every module of
    # the model that has one: the unified trunks, whatever prefix they sit under).
    cfg.SOLVER.NO_DECAY_POSITION_TABLES = True
    # Also no decay for every parameter of a normalisation layer whatever its name. Off in the recipe:
    # the LN2d of the stem and of the downsample layers (named "stem.1", "stem.4", "reduction.1")
    # do not contain "norm" and were decayed.
    cfg.SOLVER.NO_DECAY_NORM_LAYERS = False

    # Keep the best model by an evaluation metric: METRIC names a key of the evaluation results as they
    # appear in metrics.json (e.g. "bbox/AP", "segm/AP50"); "" disables it. After each evaluation
    # (TEST.EVAL_PERIOD and the end) a better value writes OUTPUT_DIR/model_best.pth (detectron2's
    # BestCheckpointer). MODE "max" or "min".
    cfg.SOLVER.BEST_CHECKPOINT = CN()
    cfg.SOLVER.BEST_CHECKPOINT.METRIC = ""
    cfg.SOLVER.BEST_CHECKPOINT.MODE = "max"

    # Training images that cannot be decoded are skipped with a warning naming them; more than this many
    # distinct bad files (per data-loader process) stop training with an error listing them.
    cfg.DATALOADER.MAX_BAD_IMAGES = 10

    # Iterations between two lines of the console/JSON/TensorBoard writers (detectron2 hard-codes 20).
    cfg.LOG_PERIOD = 20
    # Number of TEST datasets' images drawn (predictions: boxes + masks) into
    # OUTPUT_DIR/predictions_<dataset>.png after training or evaluation; 0 disables it.
    cfg.TEST.VIS_IMAGES = 0
    cfg.TEST.VIS_SCORE_THRESH = 0.5


def load_config(config_file: str, opts=()):
    """A detectron2 yacs config with the app's keys: `config_file` merged, then the command-line `opts`
    (KEY VALUE pairs), then checked (model name, BestCheckpointer mode). Has no side effects, so a mistake
    stops a command before it writes anything; every mistake is a :class:`ConfigError`."""
    import os

    from detectron2.config import get_cfg

    if not config_file:
        raise ConfigError("--config-file is required (e.g. apps/detection/configs/demo_shapes_unified_convnext_micro.yaml)")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file}: file not found")
    cfg = get_cfg()
    add_unified_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts or []))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        where = f"{config_file} with the command-line options" if opts else config_file
        raise ConfigError(f"config {where}: {str(e).strip(chr(39))}") from None
    if cfg.MODEL.BACKBONE.NAME in ("build_unified_fpn_backbone", "build_unified_backbone"):
        check_model_name(cfg.MODEL.UNIFIED.NAME)
    if cfg.SOLVER.BEST_CHECKPOINT.MODE not in ("max", "min"):
        raise ConfigError(f"SOLVER.BEST_CHECKPOINT.MODE must be max or min, got {cfg.SOLVER.BEST_CHECKPOINT.MODE!r}")
    return cfg

