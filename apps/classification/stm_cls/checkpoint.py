"""Checkpoint files: atomic writes, resume/auto-resume, evaluation and finetune loading, RNG state.

File format (the reference's): a dict with ``model``, ``optimizer``, ``epoch`` (int, or "best" /
"best-ema"), ``scaler``, ``args`` (argparse.Namespace) and ``model_ema``. This app adds
``max_accuracy``, ``max_accuracy_ema`` and ``rng_states`` (one entry per rank: torch, CUDA, numpy and
Python generator states), so that a resumed run continues exactly where the saved one stopped. The
sampler needs no state: its permutation is a function of (seed, epoch).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import sys

import numpy as np
import torch

from . import dist_utils

# Our checkpoints pickle an argparse.Namespace; allowing it keeps torch.load(weights_only=True) usable.
torch.serialization.add_safe_globals([argparse.Namespace])

EPOCH_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, mismatching optimizer state)."""


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def atomic_save(obj, path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace.

    A crash or kill at any point leaves either the old file or the complete new one, never a truncated
    file; the temp file is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temp_files(output_dir: str) -> None:
    for tmp in glob.glob(os.path.join(output_dir, ".checkpoint-*.pth.tmp-*")):
        try:
            os.remove(tmp)
        except OSError:
            pass


def load_file(path: str):
    """Load a checkpoint from a path or an http(s) URL onto the CPU.

    Safe (weights-only) unpickling is tried first; local files that need more fall back to full
    unpickling with a warning (only load checkpoints you trust).
    """
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" not in str(exc) and "Unsupported global" not in str(exc):
            raise
        print(f"WARNING: {path} needs full unpickling ({str(exc).splitlines()[0]}); loading it anyway",
              file=sys.stderr)
        return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict:
    """Generator states in plain types/tensors (so weights-only loading accepts them)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Saving during training
# --------------------------------------------------------------------------------------------------

def build_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, rng_states,
                     max_accuracy: float, max_accuracy_ema: float) -> dict:
    ckpt = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": scaler.state_dict(),
        "args": args,
        "max_accuracy": max_accuracy,
        "max_accuracy_ema": max_accuracy_ema,
        "rng_states": rng_states,
    }
    if model_ema is not None:
        ckpt["model_ema"] = model_ema.state_dict()
    return ckpt


def save_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, *, max_accuracy: float,
                    max_accuracy_ema: float, rng_states=None) -> str | None:
    """Write checkpoint-{epoch}.pth (int epoch) or checkpoint-{best,best-ema}.pth on rank 0.

    Call on every rank (the RNG states are gathered from all of them).
    """
    if rng_states is None:
        rng_states = dist_utils.all_gather_object(capture_rng_state())
    if not dist_utils.is_main_process():
        return None
    path = os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
    atomic_save(build_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, rng_states,
                                 max_accuracy, max_accuracy_ema), path)
    return path


def delete_old_epoch_checkpoint(args, epoch: int) -> None:
    """Rolling deletion: keep the last save_ckpt_num epoch checkpoints (and every 50th with
    --save_interval_ckpt)."""
    if not dist_utils.is_main_process():
        return
    old = epoch - args.save_ckpt_num * args.save_ckpt_freq
    if old < 0 or (args.save_interval_ckpt and (old + 1) % 50 == 0):
        return
    path = os.path.join(args.output_dir, f"checkpoint-{old}.pth")
    if os.path.exists(path):
        os.remove(path)


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------

def epoch_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of checkpoint-<int>.pth files, newest first."""
    found = []
    for path in glob.glob(os.path.join(output_dir, "checkpoint-*.pth")):
        m = EPOCH_CKPT_RE.match(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found, reverse=True)


def find_latest_loadable(output_dir: str):
    """Newest epoch checkpoint that loads; corrupt/truncated ones are skipped with a warning."""
    for _, path in epoch_checkpoints(output_dir):
        try:
            ckpt = load_file(path)
            if isinstance(ckpt, dict) and "model" in ckpt:
                return path, ckpt
            print(f"WARNING: {path} has no 'model' entry; skipping it", file=sys.stderr)
        except Exception as exc:
            print(f"WARNING: cannot load {path} ({type(exc).__name__}: {exc}); trying an older checkpoint",
                  file=sys.stderr)
    return None, None


def _load_released(model, path: str) -> None:
    """A weights-only file (released checkpoint): the backbone package's loader, or our own fallback
    while that package has none (bare state_dict, or the 'model'/'model_ema' entry)."""
    try:
        from stm_backbones import load_checkpoint  # type: ignore
    except ImportError:
        load_checkpoint = None
    if load_checkpoint is not None:
        try:
            load_checkpoint(model, path, strict=True)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return
    print("WARNING: stm_backbones.load_checkpoint is unavailable; loading the state_dict directly", file=sys.stderr)
    ckpt = load_file(path)
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "model_ema"):
            if key in ckpt and isinstance(ckpt[key], dict):
                state = ckpt[key]
                break
    model.load_state_dict(state, strict=True)


def resume(args, model_without_ddp, optimizer, scaler, model_ema) -> dict:
    """Load --resume (or the newest loadable checkpoint with --auto_resume); sets args.start_epoch.

    Returns {'max_accuracy', 'max_accuracy_ema', 'rng_states'} for the caller (empty when nothing
    was loaded).
    """
    ckpt = None
    if not args.resume and args.auto_resume and args.output_dir:
        path, ckpt = find_latest_loadable(args.output_dir)
        if path:
            args.resume = path
    if not args.resume:
        return {}
    print(f"Resume checkpoint {args.resume}")
    if ckpt is None:
        ckpt = load_file(args.resume)
    has_training_state = isinstance(ckpt, dict) and "optimizer" in ckpt and "epoch" in ckpt
    if not has_training_state:
        _load_released(model_without_ddp, args.resume)
        if model_ema is not None:
            model_ema.module.load_state_dict(model_without_ddp.state_dict())
        return {}
    model_without_ddp.load_state_dict(ckpt["model"], strict=True)  # the model's own (interpolating) loader
    if args.eval:
        return {}  # evaluation needs only the weights (the optimizer may have been configured differently)
    epoch = ckpt["epoch"]
    if not isinstance(epoch, int):
        raise CheckpointError(f"{args.resume} is a '{epoch}' checkpoint; resume training from a checkpoint-<epoch>.pth "
                         f"file (or use --finetune)")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as exc:
        raise CheckpointError(f"{args.resume}: optimizer state does not match this configuration ({exc}); "
                         f"were --opt/--layer_decay/--model changed?") from None
    args.start_epoch = epoch + 1
    if model_ema is not None:
        model_ema.module.load_state_dict(ckpt.get("model_ema", ckpt["model"]), strict=True)
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return {k: ckpt[k] for k in ("max_accuracy", "max_accuracy_ema", "rng_states") if k in ckpt}


def trim_log(output_dir: str, start_epoch: int) -> None:
    """Drop log.txt lines of epochs >= start_epoch (written before a crash, and about to be redone)."""
    path = os.path.join(output_dir, "log.txt")
    if not dist_utils.is_main_process() or not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("epoch", -1) >= start_epoch:
                    continue
            except (ValueError, AttributeError):
                pass
            kept.append(line)
    atomic_write_text("".join(kept), path)


# --------------------------------------------------------------------------------------------------
# Finetuning
# --------------------------------------------------------------------------------------------------

def load_finetune(args, model) -> None:
    """Initialise from --finetune: first of --model_key present, head dropped on a shape mismatch, lenient
    load (missing relative_position_index/attn_mask ignored, other differences printed)."""
    ckpt = load_file(args.finetune)
    print(f"Load pre-trained checkpoint from: {args.finetune}")
    state = ckpt
    for key in args.model_key.split("|"):
        if isinstance(ckpt, dict) and key in ckpt:
            state = ckpt[key]
            print(f"Load state_dict by model_key = {key}")
            break
    if args.model_prefix:
        state = {k[len(args.model_prefix):]: v for k, v in state.items() if k.startswith(args.model_prefix)}
    own = model.state_dict()
    for key in ("head.weight", "head.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            print(f"Removing key {key} from pretrained checkpoint (shape {tuple(state[key].shape)} vs "
                  f"{tuple(own[key].shape)})")
            del state[key]
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        print(f"Size mismatch for {k}: checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)}; skipped")
        del state[k]
    # nn.Module's plain loader on purpose: the model's strict interpolating loader is bypassed here.
    result = torch.nn.Module.load_state_dict(model, state, strict=False)
    missing = [k for k in result.missing_keys if "relative_position_index" not in k and "attn_mask" not in k]
    if missing:
        print(f"Weights of {type(model).__name__} not initialized from pretrained model: {missing}")
    if result.unexpected_keys:
        print(f"Weights from pretrained model not used in {type(model).__name__}: {result.unexpected_keys}")
