"""Checkpoint files: atomic writes, resume/auto-resume, evaluation and finetune loading, RNG state.

File format (the reference's): a dict with ``model``, ``optimizer``, ``epoch`` (int, or "best" /
"best-ema"), ``scaler``, ``args`` (argparse.Namespace) and ``model_ema``. This app adds
``max_accuracy``, ``max_accuracy_ema`` and ``rng_states`` (one entry per rank: torch, CUDA, numpy and
Python generator states), so that a resumed run continues exactly where the saved one stopped. The
sampler needs no state: its permutation is a function of (seed, epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import glob
import json
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch

from . import dist_utils

# Our checkpoints pickle an argparse.Namespace; allowing it keeps torch.load(weights_only=True) usable.
torch.serialization.add_safe_globals([argparse.Namespace])

EPOCH_CKPT_RE = re.compile(r"^checkpoint-(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (wrong kind, mismatching optimizer state)."""


class WriteError(RuntimeError):
    """A file of the run could not be written (full disk, permissions); nothing saved before is lost."""

    @classmethod
    def wrap(cls, path: str, exc: OSError) -> WriteError:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return cls(f"cannot write {path}: {reason}; files saved before are untouched (free space or choose "
                   f"another --output_dir, then rerun: the run resumes from its newest checkpoint)")


# --------------------------------------------------------------------------------------------------
# Reading and writing files
# --------------------------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_target(path: str):
    """Yield a temp path in ``path``'s folder to write; on success it replaces ``path`` (os.replace) and the
    folder is fsynced, so a crash or kill at any point leaves either the old file or the complete new one,
    never a truncated file. On failure the temp file is removed; an OSError (full disk, permissions) becomes a
    :class:`WriteError` naming ``path``. The writer must fsync the data it writes."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise WriteError.wrap(path, exc) from exc
        raise
    _fsync_dir(directory)  # make the rename itself durable


def _write_synced(tmp: str, write) -> None:
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path`` atomically (see :func:`atomic_target`)."""
    with atomic_target(path) as tmp:
        _write_synced(tmp, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str) -> None:
    with atomic_target(path) as tmp:
        _write_synced(tmp, lambda f: f.write(data))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def remove_stale_temp_files(output_dir: str) -> None:
    for tmp in glob.glob(os.path.join(output_dir, ".checkpoint-*.pth.tmp-*")):
        try:
            os.remove(tmp)
        except OSError:
            pass


class UntrustedCheckpointError(CheckpointError):
    """The file holds pickled objects that weights-only loading refuses (they could run code)."""


# torch's weights-only unpickler names what it refused in one of these forms (torch 2.6 - 2.14).
_UNSUPPORTED_GLOBAL_RE = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch 2.6")


def _refused_types(message: str) -> list[str]:
    """The global names torch's weights-only unpickler refused, from its error message."""
    return sorted(set(_UNSUPPORTED_GLOBAL_RE.findall(message)))


def load_file(path: str, trust: bool = False):
    """Load a checkpoint from a path or an http(s) URL onto the CPU, weights-only.

    Our own checkpoints hold only tensors, plain containers and an ``argparse.Namespace`` (registered
    above as a safe global), so they always load with ``weights_only=True``. A file that needs any
    other object is refused with :class:`UntrustedCheckpointError` naming the objects: unpickling them
    could run arbitrary code (a crafted ``__reduce__``). ``trust=True`` (the app's
    ``--trust_checkpoint true``) unpickles it fully; only for files whose origin you trust.
    Unreadable files (truncated, not a checkpoint) raise :class:`CheckpointError` naming the file.
    """
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        try:
            return torch.hub.load_state_dict_from_url(path, map_location="cpu", check_hash=True,
                                                      weights_only=not trust)
        except pickle.UnpicklingError as exc:
            raise _read_error(path, exc, trust) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:  # noqa: BLE001 - every failure is re-raised as a CheckpointError naming the file
        raise _read_error(path, exc, trust) from None


def _read_error(path: str, exc: Exception, trust: bool) -> CheckpointError:
    text = str(exc)
    if not trust and isinstance(exc, pickle.UnpicklingError) and _refused_types(text):
        return _untrusted(path, exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), lines[0] if lines else "")
    return CheckpointError(f"cannot read checkpoint {path}: truncated, corrupt or not a PyTorch checkpoint "
                           f"({type(exc).__name__}: {detail or 'no details'})")


def _untrusted(path: str, exc: Exception) -> UntrustedCheckpointError:
    refused = _refused_types(str(exc))
    what = ", ".join(refused) if refused else str(exc).strip().splitlines()[0]
    return UntrustedCheckpointError(
        f"{path} contains pickled objects other than tensors and plain containers ({what}); loading them could "
        f"run arbitrary code, so the file was not loaded. If you trust its origin, pass --trust_checkpoint true")


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
                     max_accuracy: float, max_accuracy_ema: float, best_epochs: dict | None = None) -> dict:
    ckpt = {
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": scaler.state_dict(),
        "args": args,
        "max_accuracy": max_accuracy,
        "max_accuracy_ema": max_accuracy_ema,
        "rng_states": rng_states,
        # Which epoch each best file must hold; a resumed run repairs them from this (repair_best_files).
        "best_epochs": dict(best_epochs or {}),
    }
    if model_ema is not None:
        ckpt["model_ema"] = model_ema.state_dict()
    return ckpt


def save_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, *, max_accuracy: float,
                    max_accuracy_ema: float, rng_states=None, best_epochs: dict | None = None,
                    path: str | None = None) -> str | None:
    """Write checkpoint-{epoch}.pth (or ``path``) atomically on rank 0; returns the path written.

    Call on every rank (the RNG states are gathered from all of them).
    """
    if rng_states is None:
        rng_states = dist_utils.all_gather_object(capture_rng_state())
    if not dist_utils.is_main_process():
        return None
    path = path or os.path.join(args.output_dir, f"checkpoint-{epoch}.pth")
    atomic_save(build_checkpoint(args, epoch, model_without_ddp, optimizer, scaler, model_ema, rng_states,
                                 max_accuracy, max_accuracy_ema, best_epochs), path)
    return path


BEST_KINDS = ("best", "best-ema")


def best_path(output_dir: str, kind: str) -> str:
    return os.path.join(output_dir, f"checkpoint-{kind}.pth")


def publish_best(source: str, target: str) -> str:
    """Make ``target`` hold the checkpoint file ``source``: a hard link (no second copy on disk), or an
    atomic byte copy where the file system cannot link. Either way ``target`` is replaced atomically, so
    a kill leaves the old best or the new one. Returns 'link' or 'copy'."""
    with atomic_target(target) as tmp:
        try:
            os.link(source, tmp)
            return "link"
        except OSError:
            pass
        with open(source, "rb") as src:
            _write_synced(tmp, lambda dst: shutil.copyfileobj(src, dst, 16 << 20))
    return "copy"


def _holds_epoch(path: str, epoch: int) -> bool:
    """Whether the checkpoint at ``path`` loads and was saved at ``epoch`` (memory-mapped: only the small
    entries are read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return isinstance(ckpt, dict) and ckpt.get("epoch") == epoch and "model" in ckpt
    except Exception:  # noqa: BLE001 - any unreadable file does not hold it
        return False


def repair_best_files(output_dir: str, best_epochs: dict) -> None:
    """After a resume, make checkpoint-best(-ema).pth hold the epochs the resumed checkpoint records.

    A run killed after writing checkpoint-N.pth (which records N as the new best) but before publishing
    checkpoint-best.pth would otherwise keep a stale best for good: the resumed run starts at N+1 and
    only rewrites the best file when it beats N's accuracy, and the rolling deletion later removes
    checkpoint-N.pth, the only copy.
    """
    if not dist_utils.is_main_process() or not output_dir:
        return
    for kind in BEST_KINDS:
        epoch = best_epochs.get(kind)
        if epoch is None:
            continue
        target, source = best_path(output_dir, kind), os.path.join(output_dir, f"checkpoint-{epoch}.pth")
        if os.path.exists(target) and os.path.exists(source) and os.path.samefile(target, source):
            continue
        if os.path.exists(target) and _holds_epoch(target, epoch):
            continue
        if os.path.exists(source) and _holds_epoch(source, epoch):
            publish_best(source, target)
            print(f"Restored {os.path.basename(target)} from {os.path.basename(source)} (the best epoch recorded "
                  f"in the resumed checkpoint; the previous run stopped before publishing it)", file=sys.stderr)
        else:
            print(f"WARNING: {target} does not hold epoch {epoch}, the best one recorded in the resumed "
                  f"checkpoint, and checkpoint-{epoch}.pth is gone; it will be rewritten at the next improvement",
                  file=sys.stderr)


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


def nonfinite_entries(state) -> list[str]:
    """Names of floating-point tensors in a state_dict holding NaN or infinity."""
    if not isinstance(state, dict):
        return []
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _check_finite(path: str, ckpt: dict, keys=("model", "model_ema")) -> None:
    for key in keys:
        bad = nonfinite_entries(ckpt.get(key))
        if bad:
            shown = ", ".join(bad[:5]) + (f" ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
            raise CheckpointError(f"{path}: '{key}' holds non-finite (NaN/inf) weights in {len(bad)} tensors: {shown}")


def find_latest_loadable(output_dir: str, trust: bool = False):
    """Newest epoch checkpoint that loads; corrupt/truncated/refused ones are skipped with a warning."""
    for _, path in epoch_checkpoints(output_dir):
        try:
            ckpt = load_file(path, trust=trust)
            if isinstance(ckpt, dict) and "model" in ckpt:
                _check_finite(path, ckpt)
                return path, ckpt
            print(f"WARNING: {path} has no 'model' entry; skipping it", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - reported, then the next older file is tried
            print(f"WARNING: cannot load {path} ({type(exc).__name__}: {exc}); trying an older checkpoint",
                  file=sys.stderr)
    return None, None


def _load_released(model, path: str, ckpt) -> None:
    """A weights-only file (released checkpoint, bare state_dict): the backbone package's loader, which
    interpolates tables to the model's geometry, or the plain strict loader for other timm models."""
    try:
        from stm_backbones import load_checkpoint  # type: ignore
    except ImportError:
        load_checkpoint = None
    if load_checkpoint is not None:
        try:
            load_checkpoint(model, ckpt, strict=True)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        return
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ("model", "model_ema", "state_dict"):
            if key in ckpt and isinstance(ckpt[key], dict):
                state = ckpt[key]
                break
    _load_strict(model, state, path)


def _load_strict(model, state, path: str) -> None:
    """model.load_state_dict(strict=True) with a one-line error naming the file and the model."""
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[:3])
        if len(detail) > 600:
            detail = detail[:600] + " ..."
        arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise CheckpointError(f"{path} does not fit the model {arch} (is it the checkpoint of another model, size "
                              f"or --nb_classes?): {detail}") from None


def resume(args, model_without_ddp, optimizer, scaler, model_ema) -> dict:
    """Load --resume (or the newest loadable checkpoint with --auto_resume); sets args.start_epoch.

    Returns {'max_accuracy', 'max_accuracy_ema', 'rng_states', 'best_epochs', 'loaded'} for the caller
    (empty when nothing was loaded).
    """
    trust = bool(getattr(args, "trust_checkpoint", False))
    ckpt = None
    if not args.resume and args.auto_resume and args.output_dir:
        path, ckpt = find_latest_loadable(args.output_dir, trust=trust)
        if path:
            args.resume = path
    if not args.resume:
        return {}
    print(f"Resume checkpoint {args.resume}")
    if ckpt is None:
        ckpt = load_file(args.resume, trust=trust)
        if isinstance(ckpt, dict):
            _check_finite(args.resume, ckpt)
    has_training_state = isinstance(ckpt, dict) and "optimizer" in ckpt and "epoch" in ckpt
    if not has_training_state:
        _load_released(model_without_ddp, args.resume, ckpt)
        if model_ema is not None:
            model_ema.module.load_state_dict(model_without_ddp.state_dict())
        return {"loaded": args.resume}
    _load_strict(model_without_ddp, ckpt["model"], args.resume)  # the model's own (interpolating) loader
    if args.eval:
        return {"loaded": args.resume}  # evaluation needs only the weights
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
        _load_strict(model_ema.module, ckpt.get("model_ema", ckpt["model"]), args.resume)
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    out = {k: ckpt[k] for k in ("max_accuracy", "max_accuracy_ema", "rng_states", "best_epochs") if k in ckpt}
    out["loaded"] = args.resume
    return out


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
    ckpt = load_file(args.finetune, trust=bool(getattr(args, "trust_checkpoint", False)))
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
