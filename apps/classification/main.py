"""Train or evaluate an image classifier (the unified spatial-token-mixer backbones, or any timm model).

    python apps/classification/main.py --model unified_convnext_micro --input_size 32 --epochs 5 \
        --batch_size 64 --output_dir output/digits

Without --data_path the run uses the embedded handwritten-digits dataset with lighter defaults
(see --data_path). Multi-process: torchrun --nproc_per_node N apps/classification/main.py ..., or
srun under SLURM (apps/classification/slurm_train.sh).
"""

from __future__ import annotations

import argparse
import os
import sys

# Idle OpenMP threads sleep instead of spinning (must be set before torch loads). On a shared CPU,
# spinning threads of a 2-thread run fight other processes and made steps ~10x slower in our measurements.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The app's modules live next to this file (package stm_cls); make them importable however we are run.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Standard library only (see stm_cls/config.py): --help and argument errors never wait for torch.
from stm_cls.config import (  # noqa: E402
    DIGITS_DEFAULTS,
    apply_digits_defaults,
    explicit_dests,
    parse_model_kwarg,
    str2bool,
)

EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE_LOSS = 3
EXIT_DATA_ERROR = 4


def get_args_parser() -> argparse.ArgumentParser:
    digits_note = ", ".join(f"{k}={v}" for k, v in DIGITS_DEFAULTS.items())
    p = argparse.ArgumentParser(
        "Image classification training and evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Booleans accept yes/no, true/false, t/f, y/n, 1/0. Exit codes: 2 bad arguments or data layout, "
               "3 non-finite loss, 4 unreadable data during the run.")
    p.add_argument("--batch_size", default=1024, type=int, help="per-process batch size (train and val loaders)")
    p.add_argument("--epochs", default=300, type=int, help="number of training epochs")
    p.add_argument("--update_freq", default=1, type=int, help="gradient-accumulation steps per optimizer step")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="unified_swin_tiny", type=str,
                   help="timm registry name, e.g. unified_{halo,pvt,swin,convnext,dcn_v3}_{micro,tiny,small,base}")
    g.add_argument("--input_size", default=224, type=int, help="train crop / eval image size (also the model's img_size)")
    g.add_argument("--layer_scale_init_value", default=1e-6, type=float,
                   help="initial layer-scale value, passed to unified_*/official_* model constructors")
    g.add_argument("--drop_path", default=None, type=float,
                   help="max stochastic-depth rate (linearly increasing over blocks). Unset: the model's own "
                        "per-size rate, the study's (micro 0.0; tiny 0.1 ConvNeXt/PVT/DCNv3, 0.2 Halo/Swin; "
                        "small 0.3, ConvNeXt 0.4; base 0.5); timm models: their default")
    g.add_argument("--pretrained", default=False, type=str2bool,
                   help="initialise from the model's pretrained weights (timm's pretrained_cfg); the classifier "
                        "is re-initialised when --nb_classes differs from the weights' class count")
    g.add_argument("--pretrained_path", default="", type=str,
                   help="pretrained weights from this file instead (implies --pretrained; timm's "
                        "pretrained_cfg_overlay=dict(file=...)), e.g. the study's unified_halonet_tiny.pth")
    g.add_argument("--grad_checkpointing", default=False, type=str2bool,
                   help="activation (gradient) checkpointing: recompute each block in the backward pass, "
                        "trading compute for memory (model.set_grad_checkpointing)")
    g.add_argument("--model_kwargs", default={}, nargs="*", type=parse_model_kwarg, metavar="KEY=VALUE",
                   help="extra model constructor arguments; values are Python literals (3, 0.1, True, None, "
                        "(2,2,6,2), 'text') or bare words taken as strings, e.g. --model_kwargs depths=(2,2,2,2)")
    g.add_argument("--compile", default=False, type=str2bool, help="wrap the model in torch.compile")

    g = p.add_argument_group("EMA")
    g.add_argument("--model_ema", default=True, type=str2bool, help="keep an exponential moving average of the weights")
    g.add_argument("--model_ema_decay", default=0.9999, type=float, help="EMA decay per optimizer step")
    g.add_argument("--model_ema_force_cpu", default=False, type=str2bool, help="keep the EMA copy on the CPU")
    g.add_argument("--model_ema_eval", default=True, type=str2bool, help="also evaluate the EMA model every epoch")

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="adamw", type=str,
                   help="optimizer (timm names: adamw, sgd, lamb, ...; prefix lookahead_ to wrap in Lookahead)")
    g.add_argument("--opt_eps", default=1e-8, type=float, help="optimizer epsilon")
    g.add_argument("--opt_betas", default=None, type=float, nargs="+", help="optimizer betas (torch defaults if unset)")
    g.add_argument("--clip_grad", default=5.0, type=float, help="max global gradient L2 norm (<= 0 disables clipping)")
    g.add_argument("--momentum", default=0.9, type=float, help="SGD-family momentum")
    g.add_argument("--weight_decay", default=0.05, type=float, help="weight decay")
    g.add_argument("--weight_decay_end", default=None, type=float,
                   help="final value of the cosine weight-decay schedule (unset: constant --weight_decay)")
    g.add_argument("--lr", default=1e-3, type=float, help="peak learning rate (absolute, not scaled by batch size)")
    g.add_argument("--warmup_init_lr", default=1e-6, type=float, help="learning rate at the first warmup iteration")
    g.add_argument("--layer_decay", default=1.0, type=float, help="layer-wise LR decay factor (1.0 = off)")
    g.add_argument("--min_lr", default=1e-5, type=float, help="end value of the cosine LR schedule")
    g.add_argument("--warmup_epochs", default=20, type=int, help="linear LR warmup length in epochs")
    g.add_argument("--warmup_steps", default=-1, type=int, help="warmup length in iterations; > 0 overrides --warmup_epochs")

    g = p.add_argument_group("augmentation")
    g.add_argument("--color_jitter", default=0.4, type=float, help="colour jitter strength (ignored while --aa is set)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", type=str, help="timm RandAugment/AutoAugment policy ('none' = off)")
    g.add_argument("--smoothing", default=0.1, type=float, help="label smoothing")
    g.add_argument("--train_interpolation", default="bicubic", type=str, help="train resize interpolation (random, bilinear, bicubic)")
    g.add_argument("--repeated_aug", default=False, type=str2bool, help="repeated-augmentation sampler (3 repeats)")
    g.add_argument("--crop_pct", default=None, type=float,
                   help="eval: resize to input_size / crop_pct, then centre-crop. Unset: the model's pretrained_cfg "
                        "(0.875 for the study's models), and at --input_size >= 384 a plain resize without crop, "
                        "as in the study")
    g.add_argument("--eval_interpolation", default=None, type=str, choices=["bilinear", "bicubic", "nearest"],
                   help="eval resize interpolation (unset: the model's pretrained_cfg, bicubic for the study's models)")
    g.add_argument("--reprob", default=0.25, type=float, help="random-erasing probability")
    g.add_argument("--remode", default="pixel", type=str, help="random-erasing fill mode (const, rand, pixel)")
    g.add_argument("--recount", default=1, type=int, help="random-erasing box count")
    g.add_argument("--mixup", default=0.8, type=float, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", default=1.0, type=float, help="cutmix alpha (0 = off)")
    g.add_argument("--cutmix_minmax", default=None, type=float, nargs="+", help="cutmix min/max box ratio (overrides alpha)")
    g.add_argument("--mixup_prob", default=1.0, type=float, help="probability of mixing a batch")
    g.add_argument("--mixup_switch_prob", default=0.5, type=float, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup_mode", default="batch", type=str, help="mixup granularity: batch, pair or elem")

    g = p.add_argument_group("finetuning")
    g.add_argument("--finetune", default="", type=str, help="initialise from this checkpoint (path or URL), leniently")
    g.add_argument("--head_init_scale", default=1.0, type=float,
                   help="multiply the newly initialised classifier's weight and bias by this (ConvNeXt's finetuning "
                        "trick; a head loaded from --finetune/--pretrained weights of the same shape keeps its values)")
    g.add_argument("--model_key", default="model|module", type=str, help="keys tried in order inside a finetune checkpoint")
    g.add_argument("--model_prefix", default="", type=str, help="key prefix selected (and stripped) when finetuning")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=None, type=str,
                   help="dataset root: meta/{train,val}.txt + train/ + val/ (ImageNet list layout) or train/<class>/* "
                        "+ val/<class>/* (class folders), detected automatically. Unset (the default, instead of the "
                        "reference's ./minidata): the embedded scikit-learn digits, written once to "
                        "${STM_CACHE:-~/.cache/stm}/digits_imagenet, nb_classes=10, and these defaults unless given on "
                        f"the command line: {digits_note}, train crops scale (0.6, 1) without flips")
    g.add_argument("--data_on_memory", default=False, type=str2bool,
                   help="read all encoded images into RAM first (whole dataset per process: for small datasets)")
    g.add_argument("--nb_classes", default=1000, type=int,
                   help="number of classes (list labels must be below it; class-folder/digits data set it)")
    g.add_argument("--imagenet_default_mean_and_std", default=None, type=str2bool,
                   help="true: ImageNet mean/std normalisation; false: Inception 0.5/0.5; unset: the model's "
                        "pretrained_cfg (ImageNet's for the study's models)")
    g.add_argument("--max_failed_images", default=100, type=int,
                   help="stop when more distinct images than this (per process) failed to decode (-1 = no limit); "
                        "50 consecutive failures always stop")

    g = p.add_argument_group("run")
    g.add_argument("--output_dir", default="", type=str, help="where checkpoints, log.txt and the plot go ('' = no saving)")
    g.add_argument("--log_dir", default=None, type=str, help="TensorBoard directory (rank 0)")
    g.add_argument("--device", default=None, type=str, help="device (default: cuda if available, else cpu)")
    g.add_argument("--seed", default=0, type=int, help="random seed (each rank uses seed + rank)")
    g.add_argument("--resume", default="", type=str, help="checkpoint to resume from (path or https URL)")
    g.add_argument("--auto_resume", default=True, type=str2bool,
                   help="without --resume, continue from the newest loadable output_dir/checkpoint-<epoch>.pth")
    g.add_argument("--save_ckpt", default=True, type=str2bool, help="write checkpoints")
    g.add_argument("--save_interval_ckpt", default=False, type=str2bool, help="never delete every 50th epoch checkpoint")
    g.add_argument("--save_ckpt_freq", default=1, type=int, help="save every N epochs (and at the last)")
    g.add_argument("--save_ckpt_num", default=3, type=int, help="number of rolling epoch checkpoints kept")
    g.add_argument("--start_epoch", default=0, type=int, help="first epoch (set by resuming)")
    g.add_argument("--eval", default=False, type=str2bool, help="only evaluate (--resume CKPT), evaluating its 'model'")
    g.add_argument("--eval_random_weights", default=False, type=str2bool,
                   help="allow --eval without any checkpoint or pretrained weights (evaluates a random initialisation)")
    g.add_argument("--trust_checkpoint", default=False, type=str2bool,
                   help="unpickle checkpoint files fully (--resume, --finetune, auto-resume). Off: only tensors, plain "
                        "containers and argparse.Namespace are loaded, and a file holding anything else is refused, "
                        "since unpickling it could run arbitrary code. Turn on only for files whose origin you trust")
    g.add_argument("--dist_eval", default=True, type=str2bool, help="shard validation over processes (no padding)")
    g.add_argument("--disable_eval", default=False, type=str2bool, help="skip validation (also turns off --dist_eval)")
    g.add_argument("--num_workers", default=10, type=int, help="data-loading worker processes per process")
    g.add_argument("--pin_mem", default=True, type=str2bool, help="pin loader memory (CUDA only)")
    g.add_argument("--use_amp", default=True, type=str2bool,
                   help="mixed precision (autocast; float16 adds a GradScaler)")
    g.add_argument("--amp_dtype", default=None, choices=["bfloat16", "float16"],
                   help="autocast dtype (default: bfloat16 on CPU, float16 on CUDA)")

    g = p.add_argument_group("distributed (world size and ranks come from torchrun, SLURM or OpenMPI env vars)")
    g.add_argument("--world_size", default=1, type=int, help="overwritten from the environment")
    g.add_argument("--local_rank", default=-1, type=int,
                   help="accepted because torch.distributed.launch passes it; LOCAL_RANK is read from the environment")
    g.add_argument("--dist_on_itp", default=False, type=str2bool, help="read OpenMPI variables for rank/world size")
    g.add_argument("--dist_url", default="env://", help="process-group init URL")

    g = p.add_argument_group("Weights & Biases")
    g.add_argument("--enable_wandb", default=False, type=str2bool, help="log to W&B (needs the wandb package)")
    g.add_argument("--project", default="unified_model_eval", type=str, help="W&B project")
    g.add_argument("--name", default="unified_model_eval", type=str, help="W&B run name")
    g.add_argument("--wandb_ckpt", default=False, type=str2bool, help="upload checkpoints to W&B")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.model_kwargs = dict(args.model_kwargs or {})  # [(key, value), ...] from the parser; a later key wins
    if args.data_path is None:
        for note in apply_digits_defaults(args, explicit_dests(get_args_parser, argv)):
            print(f"[digits defaults] {note}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # Heavy imports after argument parsing, so --help and argument errors are instant.
    from stm_cls.checkpoint import CheckpointError, WriteError
    from stm_cls.datasets import DatasetError, UnreadableDataError
    from stm_cls.engine import NonFiniteLossError
    from stm_cls.models import ModelConfigError, UnknownModelError
    from stm_cls.train import ConfigError, run

    try:
        run(args)
    except (DatasetError, UnknownModelError, ModelConfigError, ConfigError, CheckpointError,
            FileNotFoundError, WriteError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except NonFiniteLossError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_NONFINITE_LOSS
    except UnreadableDataError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_DATA_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
