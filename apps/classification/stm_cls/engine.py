"""One training epoch and one evaluation pass."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from . import dist_utils
from .metrics import ProgressLogger
from .optim import apply_schedules

PRINT_FREQ = 10


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run must stop without saving."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(model, criterion, loader, optimizer, device, epoch: int, *, scaler, iters_per_epoch: int,
                    update_freq: int = 1, lr_schedule=None, wd_schedule=None, clip_grad: float | None = None,
                    model_ema=None, mixup_fn=None, use_amp: bool = False, amp_dtype=torch.bfloat16,
                    log_writer=None, print_freq: int = PRINT_FREQ) -> dict[str, float]:
    """Train for ``iters_per_epoch`` optimizer steps (each over ``update_freq`` loader batches).

    The LR/WD of global step ``epoch * iters_per_epoch + step`` are written before each accumulation
    cycle. Raises NonFiniteLossError as soon as any rank sees a non-finite loss (before backward, so
    the weights are not touched).
    """
    model.train(True)
    optimizer.zero_grad(set_to_none=True)
    micro_steps = iters_per_epoch * update_freq
    progress = ProgressLogger(f"Epoch: [{epoch}]", micro_steps, print_freq)
    is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    max_norm = clip_grad if clip_grad and clip_grad > 0 else float("inf")
    images_seen = 0
    for micro_step, (samples, targets) in enumerate(loader):
        if micro_step >= micro_steps:  # batches beyond the scheduled iterations are skipped
            break
        progress.mark_data()
        step = micro_step // update_freq
        global_it = epoch * iters_per_epoch + step
        first_micro, last_micro = micro_step % update_freq == 0, (micro_step + 1) % update_freq == 0
        if first_micro:
            apply_schedules(optimizer, None if lr_schedule is None else float(lr_schedule[global_it]),
                            None if wd_schedule is None else float(wd_schedule[global_it]))
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        hard_targets = targets
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        # Gradients are only all-reduced on the last micro-step of an accumulation cycle.
        sync = model.no_sync() if (is_ddp and not last_micro) else contextlib.nullcontext()
        with sync:
            with autocast(device, use_amp, amp_dtype):
                output = model(samples)
                loss = criterion(output, targets)
            loss_value = loss.item()
            if dist_utils.any_rank_true(not math.isfinite(loss_value), device):
                raise NonFiniteLossError(
                    f"loss is {loss_value} (rank {dist_utils.get_rank()}) at epoch {epoch}, iteration {step}; "
                    f"stopping: the last saved checkpoint is left untouched")
            scaler.scale(loss / update_freq).backward()

        grad_norm = None
        if last_micro:
            scaler.unscale_(optimizer)  # so clipping sees the true gradient norm
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(unwrap(model))

        lrs = [g["lr"] for g in optimizer.param_groups]
        wds = [g["weight_decay"] for g in optimizer.param_groups if g["weight_decay"] > 0]
        class_acc = None
        if mixup_fn is None:
            class_acc = (output.argmax(dim=-1) == hard_targets).float().mean().item()
        progress.update(n=samples.shape[0], loss=loss_value, class_acc=class_acc)
        progress.update(lr=max(lrs), min_lr=min(lrs), weight_decay=max(wds) if wds else 0.0,
                        grad_norm=grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None)
        if scaler.is_enabled():
            progress.update(loss_scale=scaler.get_scale())
        images_seen += samples.shape[0]
        if log_writer is not None and last_micro:
            log_writer.add_scalar("loss/train_loss", loss_value, global_it)
            if class_acc is not None:
                log_writer.add_scalar("loss/class_acc", class_acc, global_it)
            log_writer.add_scalar("opt/lr", max(lrs), global_it)
            log_writer.add_scalar("opt/min_lr", min(lrs), global_it)
            log_writer.add_scalar("opt/weight_decay", max(wds) if wds else 0.0, global_it)
            if grad_norm is not None:
                log_writer.add_scalar("opt/grad_norm", grad_norm, global_it)
        progress.step(micro_step)

    stats = _global_averages(progress, device)
    elapsed = progress.elapsed()
    stats["images_per_sec"] = images_seen * dist_utils.get_world_size() / max(elapsed, 1e-9)
    stats["epoch_time"] = elapsed
    print("Averaged stats: " + "  ".join(f"{k}: {v:.6g}" for k, v in stats.items()), flush=True)
    return stats


def _global_averages(progress: ProgressLogger, device) -> dict[str, float]:
    """Count-weighted averages of the meters over all ranks."""
    names = sorted(progress.meters)
    local = []
    for n in names:
        local += [progress.meters[n].total, progress.meters[n].count]
    summed = dist_utils.all_reduce_sum(local, device)
    return {n: summed[2 * i] / max(summed[2 * i + 1], 1) for i, n in enumerate(names)}


@torch.no_grad()
def evaluate(loader, model, device, use_amp: bool = False, amp_dtype=torch.bfloat16, header: str = "Test:",
             print_freq: int = PRINT_FREQ, reduce_device=None) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean CE loss over the whole set.

    Each rank sums correct counts and losses over its own shard; the sums are all-reduced, so with a
    non-padding sampler the result equals a single-process evaluation. Batches may carry a third item,
    the number of unreadable images dropped from them (``datasets.collate_skipping``): those images are
    not counted, and their total is reported as ``num_skipped``.
    """
    model.eval()
    progress = ProgressLogger(header, len(loader), print_freq)
    sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss * n, top-1 correct, top-5 correct, n, skipped
    for i, batch in enumerate(loader):
        progress.mark_data()
        images, target = batch[0], batch[1]
        sums[4] += batch[2] if len(batch) > 2 else 0
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, use_amp, amp_dtype):
            output = model(images)
        output = output.float()
        loss = F.cross_entropy(output, target, reduction="sum")
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        hits = top.eq(target[:, None])
        sums[0] += loss.item()
        sums[1] += hits[:, :1].sum().item()
        sums[2] += hits.sum().item()
        sums[3] += images.shape[0]
        progress.step(i, extra=f"acc1: {100.0 * sums[1] / sums[3]:.2f}")
    total_loss, correct1, correct5, count, skipped = dist_utils.all_reduce_sum(sums, reduce_device or device)
    elapsed = progress.elapsed()
    stats = dict(acc1=100.0 * correct1 / max(count, 1), acc5=100.0 * correct5 / max(count, 1),
                 loss=total_loss / max(count, 1), num_images=int(count),
                 images_per_sec=count / max(elapsed, 1e-9), num_skipped=int(skipped))
    note = f"; {int(skipped)} unreadable images skipped, not counted" if skipped else ""
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({int(count)} images, {stats['images_per_sec']:.1f} images/s{note})", flush=True)
    return stats
