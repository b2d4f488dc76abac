"""The training/evaluation driver: builds everything from the parsed arguments and runs the epochs."""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from . import checkpoint as ckpt_io
from . import dist_utils
from .datasets import RepeatedAugSampler, ShardedEvalSampler, build_datasets, collate_skipping
from .ema import ModelEma
from .engine import evaluate, train_one_epoch
from .models import create_model, import_backbones, input_size_error, sizes_that_work
from .optim import build_optimizer, cosine_schedule
from .plotting import plot_curves

AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ConfigError(ValueError):
    """Arguments that cannot work together (reported before any training)."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def configure_cpu_threads(device: torch.device) -> None:
    """On a busy shared CPU, use fewer intra-op threads than cores.

    When other processes already occupy the cores, OpenMP threads that wait for each other slowed a
    micro model's training step from 0.1-0.2 s to 5-12 s in our measurements (2 cores). Only applies
    when the user has not chosen (OMP_NUM_THREADS unset) and the run is single-process (torchrun sets
    one thread per process itself).
    """
    if device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or dist_utils.is_dist():
        return
    try:
        load = os.getloadavg()[0]
        cores = len(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return
    wanted = max(1, min(torch.get_num_threads(), int(round(cores - load))))
    if wanted < torch.get_num_threads():
        print(f"CPU load average {load:.1f} on {cores} cores: using {wanted} of {torch.get_num_threads()} "
              f"intra-op threads (set OMP_NUM_THREADS to choose)")
        torch.set_num_threads(wanted)


def build_loaders(args, train_set, val_set):
    world, rank = dist_utils.get_world_size(), dist_utils.get_rank()
    if args.repeated_aug:
        train_sampler = RepeatedAugSampler(train_set, world, rank, shuffle=True, seed=args.seed)
    else:
        # Also used in single-process mode, with set_epoch every epoch (the reference repeats epoch 0's
        # permutation without a process group); the order is a function of (seed, epoch) only.
        train_sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    pin = bool(args.pin_mem) and str(args.device).startswith("cuda")
    train_loader = DataLoader(train_set, sampler=train_sampler, batch_size=args.batch_size,
                              num_workers=args.num_workers, pin_memory=pin, drop_last=True,
                              persistent_workers=args.num_workers > 0)
    val_loader = None
    if val_set is not None:
        val_sampler = ShardedEvalSampler(val_set, world, rank) if args.dist_eval else SequentialSampler(val_set)
        # Unreadable validation images are dropped from their batch (and reported), never replaced.
        val_loader = DataLoader(val_set, sampler=val_sampler, batch_size=args.batch_size,
                                num_workers=args.num_workers, pin_memory=pin, drop_last=False,
                                collate_fn=collate_skipping if getattr(val_set, "skip_unreadable", False) else None)
    return train_sampler, train_loader, val_loader


def build_mixup_and_criterion(args):
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise ConfigError(f"mixup/cutmix need an even --batch_size (got {args.batch_size}); "
                              f"use an even size or --mixup 0 --cutmix 0")
        print("Mixup is activated!")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is already folded into the mixed targets
    elif args.smoothing > 0.0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    print(f"criterion = {criterion}")
    return mixup_fn, criterion


def make_scaler(args, device):
    # A loss scaler is only needed for float16; bfloat16 has float32's exponent range.
    enabled = bool(args.use_amp) and args.amp_dtype in ("float16", "fp16")
    return torch.amp.GradScaler(device.type, enabled=enabled)


def resolve_runtime_defaults(args) -> None:
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.amp_dtype is None:
        args.amp_dtype = "float16" if str(args.device).startswith("cuda") else "bfloat16"
    if args.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"--amp_dtype must be bfloat16 or float16, got {args.amp_dtype}")
    if args.disable_eval:
        args.dist_eval = False
    validate_numbers(args)


# (flag, smallest allowed value); checked before anything is built, so a typo never starts a run.
POSITIVE_FLAGS = (("batch_size", 1), ("update_freq", 1), ("input_size", 1), ("save_ckpt_freq", 1),
                  ("save_ckpt_num", 1), ("epochs", 0), ("num_workers", 0), ("start_epoch", 0))


def validate_numbers(args) -> None:
    for name, low in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"--{name} must be >= {low}, got {value}")
    if not args.eval and args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 for training, got {args.epochs}")
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise ConfigError(f"--crop_pct must be in (0, 1], got {args.crop_pct}")


def start_wandb(args):
    try:
        import wandb
    except ImportError:
        raise ConfigError("--enable_wandb needs the wandb package (pip install wandb)") from None
    return wandb.init(project=args.project, name=args.name, config=vars(args))


def append_log(output_dir: str, row: dict) -> None:
    path = os.path.join(output_dir, "log.txt")
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ckpt_io.WriteError.wrap(path, exc) from exc


def configure_cuda_backends(device: torch.device) -> None:
    """The study's GPU settings: cuDNN autotuning and TF32 matmuls/convolutions (no effect on the CPU)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def wrap_distributed(model: torch.nn.Module, args, device: torch.device, ddp=None):
    """(model to train, model_without_ddp). In a distributed run on CUDA, BatchNorm becomes SyncBatchNorm
    (before DDP, so the EMA copy made earlier stays a plain model) and DDP gets this process's GPU; on the
    CPU, PyTorch's SyncBatchNorm has no kernel, so each process keeps its own statistics (said once).
    ``ddp`` replaces DistributedDataParallel (tests)."""
    if not args.distributed:
        return model, model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        print("Note: SyncBatchNorm needs CUDA; on the CPU each process keeps its own BatchNorm statistics")
    ddp = ddp or torch.nn.parallel.DistributedDataParallel
    wrapped = ddp(model, device_ids=[args.gpu] if device.type == "cuda" else None, find_unused_parameters=False)
    return wrapped, model


def save_checkpoints(args, epoch: int, best_kinds: list[str], model_without_ddp, optimizer, scaler, model_ema,
                     common: dict) -> None:
    """This epoch's checkpoint, then the best files it improved, then the rolling deletion.

    The best files are hard links to checkpoint-<epoch>.pth (no second copy; removing the epoch file later
    keeps them), replaced atomically. An epoch checkpoint records which epoch each best file holds, so if a
    kill falls between the two writes the resumed run publishes the best files first (repair_best_files).
    In an epoch without an epoch checkpoint (--save_ckpt_freq > 1) an improved best is written as a whole
    file, before any later epoch checkpoint can record it.
    """
    epoch_path = None
    if (epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs:
        epoch_path = ckpt_io.save_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, **common)
    for kind in best_kinds:
        target = ckpt_io.best_path(args.output_dir, kind)
        if epoch_path is not None:
            ckpt_io.publish_best(epoch_path, target)
        else:
            ckpt_io.save_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, path=target,
                                    **common)
    if epoch_path is not None:
        ckpt_io.delete_old_epoch_checkpoint(args, epoch)


def plot_safely(output_dir: str) -> str | None:
    """The curves PNG is a convenience: failing to draw or write it (full disk) warns and goes on."""
    try:
        return plot_curves(output_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"WARNING: could not write the training-curves plot in {output_dir} ({exc})", file=sys.stderr)
        for name in os.listdir(output_dir):
            if name.startswith(".training_curves") and ".tmp-" in name:
                try:
                    os.remove(os.path.join(output_dir, name))
                except OSError:
                    pass
        return None


def _has_pretrained_weights(args) -> bool:
    return bool(getattr(args, "pretrained", False) or getattr(args, "pretrained_path", ""))


def check_input_size(model: torch.nn.Module, args) -> None:
    """Run one image of --input_size through the model before anything else, so that a size the model
    cannot take fails now with the sizes that work, not at the first training step."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, args.input_size, args.input_size))
    except (ValueError, RuntimeError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # suggestions only when the block's own rule refuses the size (another failure is not about the size)
        working = sizes_that_work(model, args.input_size) if input_size_error(model, args.input_size) else []
        hint = (f" Input sizes that work with {args.model} near {args.input_size}: "
                f"{', '.join(map(str, working))}." if working else "")
        raise ConfigError(f"--input_size {args.input_size} does not work with {args.model}: {first}.{hint}") from None
    finally:
        model.train(was_training)


def run(args) -> dict:
    """Train (or, with --eval, evaluate) as configured by ``args``; returns the last stats."""
    resolve_runtime_defaults(args)
    dist_utils.init_distributed(args)
    try:
        return _run(args)
    finally:
        dist_utils.cleanup_distributed()


def _run(args) -> dict:
    device = torch.device(args.device)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    seed_everything(args.seed + rank)
    configure_cuda_backends(device)
    amp_dtype = AMP_DTYPES[args.amp_dtype]
    configure_cpu_threads(device)
    print(f"args: {json.dumps(vars(args), default=str)}")

    import_backbones()
    train_set, val_set = build_datasets(args)
    if args.disable_eval and not args.eval:
        val_set = None
    train_sampler, train_loader, val_loader = build_loaders(args, train_set, val_set)

    model = create_model(args)
    check_input_size(model, args)
    if args.finetune:
        ckpt_io.load_finetune(args, model)
    model.to(device)
    model_ema = None
    if args.model_ema:
        # Created before SyncBN/DDP so it is a plain copy of the model.
        model_ema = ModelEma(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
        print(f"Using EMA with decay = {args.model_ema_decay:.8f}")
    model, model_without_ddp = wrap_distributed(model, args, device)
    if args.compile:
        model = torch.compile(model)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"Model {args.model}: {n_parameters / 1e6:.3f}M parameters")

    total_batch = args.batch_size * args.update_freq * world
    iters_per_epoch = len(train_set) // total_batch
    print(f"LR = {args.lr:.8f}, batch size = {total_batch} ({args.batch_size} x {args.update_freq} x {world}), "
          f"update frequency = {args.update_freq}, iterations per epoch = {iters_per_epoch}")
    if iters_per_epoch == 0 and not args.eval:
        raise ConfigError(f"{len(train_set)} training images are fewer than one total batch ({total_batch}); "
                          f"lower --batch_size or --update_freq")
    optimizer = build_optimizer(args, model_without_ddp)
    scaler = make_scaler(args, device)
    mixup_fn, criterion = build_mixup_and_criterion(args)

    resumed = ckpt_io.resume(args, model_without_ddp, optimizer, scaler, model_ema)
    use_amp = bool(args.use_amp)
    if args.eval and not (resumed.get("loaded") or args.finetune or _has_pretrained_weights(args)) \
            and not args.eval_random_weights:
        raise ConfigError("--eval true needs weights to evaluate: pass --resume CKPT (or --finetune CKPT, "
                          "--pretrained), or --eval_random_weights true to evaluate a randomly initialised model "
                          "on purpose")
    if args.eval:
        stats = evaluate(val_loader, model, device, use_amp, amp_dtype)
        print(f"Accuracy of the network on the {stats['num_images']} test images: {stats['acc1']:.2f}%")
        return stats

    lr_schedule = cosine_schedule(args.lr, args.min_lr, args.epochs, iters_per_epoch, args.warmup_epochs,
                                  args.warmup_init_lr, args.warmup_steps)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd_schedule = cosine_schedule(args.weight_decay, wd_end, args.epochs, iters_per_epoch)
    print(f"Max WD = {max(wd_schedule):.7f}, Min WD = {min(wd_schedule):.7f}")

    log_writer = None
    if args.log_dir and dist_utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(args.log_dir, exist_ok=True)
        log_writer = SummaryWriter(log_dir=args.log_dir)
    wandb_run = start_wandb(args) if args.enable_wandb and dist_utils.is_main_process() else None
    save = bool(args.output_dir) and bool(args.save_ckpt)
    if args.output_dir and dist_utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        ckpt_io.remove_stale_temp_files(args.output_dir)
        ckpt_io.trim_log(args.output_dir, args.start_epoch)

    max_accuracy = resumed.get("max_accuracy", 0.0)
    max_accuracy_ema = resumed.get("max_accuracy_ema", 0.0)
    best_epochs = dict(resumed.get("best_epochs") or {})
    if save and best_epochs:
        ckpt_io.repair_best_files(args.output_dir, best_epochs)
    rng_states = resumed.get("rng_states")
    if rng_states is not None and len(rng_states) == world:
        # Continue the random streams exactly where the saved run stopped (augmentation, mixup, workers).
        ckpt_io.restore_rng_state(rng_states[rank])
    elif resumed:
        seed_everything(args.seed + rank + 1000 * args.start_epoch)

    print(f"Start training for {args.epochs} epochs (from epoch {args.start_epoch})")
    start_time = time.time()
    last = {}
    for epoch in range(args.start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, criterion, train_loader, optimizer, device, epoch, scaler=scaler, iters_per_epoch=iters_per_epoch,
            update_freq=args.update_freq, lr_schedule=lr_schedule, wd_schedule=wd_schedule, clip_grad=args.clip_grad,
            model_ema=model_ema, mixup_fn=mixup_fn, use_amp=use_amp, amp_dtype=amp_dtype, log_writer=log_writer)
        row = {f"train_{k}": v for k, v in train_stats.items()}
        improved = improved_ema = False
        if val_loader is not None:
            test_stats = evaluate(val_loader, model, device, use_amp, amp_dtype)
            improved = test_stats["acc1"] > max_accuracy
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"Accuracy of the model on the {test_stats['num_images']} test images: {test_stats['acc1']:.2f}%  "
                  f"(max {max_accuracy:.2f}%)")
            row.update({f"test_{k}": v for k, v in test_stats.items()})
            if log_writer is not None:
                for k in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"perf/test_{k}", test_stats[k], epoch)
            if model_ema is not None and args.model_ema_eval:
                ema_device = torch.device("cpu") if args.model_ema_force_cpu else device
                ema_stats = evaluate(val_loader, model_ema.module, ema_device, use_amp, amp_dtype, header="Test (EMA):",
                                     reduce_device=device)
                improved_ema = ema_stats["acc1"] > max_accuracy_ema
                max_accuracy_ema = max(max_accuracy_ema, ema_stats["acc1"])
                print(f"Accuracy of the EMA model: {ema_stats['acc1']:.2f}%  (max {max_accuracy_ema:.2f}%)")
                row.update({f"test_{k}_ema": v for k, v in ema_stats.items()})
                if log_writer is not None:
                    log_writer.add_scalar("perf/test_acc1_ema", ema_stats["acc1"], epoch)
        row.update(epoch=epoch, n_parameters=n_parameters)
        last = row

        if args.output_dir and dist_utils.is_main_process():
            # The log line goes first; a resumed run drops lines of epochs it redoes (trim_log).
            append_log(args.output_dir, row)
        if save:
            # One snapshot of every rank's generators after this epoch's last random draw.
            rng = dist_utils.all_gather_object(ckpt_io.capture_rng_state())
            for kind, better in zip(ckpt_io.BEST_KINDS, (improved, improved_ema)):
                if better:
                    best_epochs[kind] = epoch
            common = dict(max_accuracy=max_accuracy, max_accuracy_ema=max_accuracy_ema, rng_states=rng,
                          best_epochs=best_epochs)
            save_checkpoints(args, epoch, [k for k, b in zip(ckpt_io.BEST_KINDS, (improved, improved_ema)) if b],
                             model_without_ddp, optimizer, scaler, model_ema, common)
        if args.output_dir and dist_utils.is_main_process():
            plot_safely(args.output_dir)
        if log_writer is not None:
            log_writer.flush()
        if wandb_run is not None:
            wandb_run.log(row, step=epoch)
            if args.wandb_ckpt and save and args.output_dir:
                wandb_run.save(os.path.join(args.output_dir, f"checkpoint-{epoch}.pth"), base_path=args.output_dir)
        dist_utils.barrier()

    total = time.time() - start_time
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(total))} ({total:.1f} s); "
          f"max accuracy {max_accuracy:.2f}%" + (f", EMA {max_accuracy_ema:.2f}%" if model_ema is not None else ""))
    if args.output_dir and dist_utils.is_main_process():
        path = plot_safely(args.output_dir)
        if path:
            print(f"Curves: {path}")
    if log_writer is not None:
        log_writer.close()
    if wandb_run is not None:
        wandb_run.finish()
    return last
