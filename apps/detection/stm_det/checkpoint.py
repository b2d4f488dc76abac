"""Crash-safe detection checkpoints: atomic writes, weights-only loads, and a resume that survives a
truncated or corrupt file.

detectron2's ``Checkpointer.save`` streams ``torch.save`` straight into ``model_*.pth`` and rewrites the
``last_checkpoint`` pointer in place, without fsync. A kill during the write (or a power loss shortly
after) leaves a truncated file that ``--resume`` then either crashes on or, for ``model_final.pth``,
never rewrites. :class:`AtomicCheckpointer` writes every file to a temp file in the same folder, fsyncs
it, renames it over the target and fsyncs the folder, so a reader only ever sees the old file or the
complete new one. Loading always uses ``torch.load(weights_only=True)``: a checkpoint of this app only
holds tensors, numbers, strings and containers, so nothing in a file can run code.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import re
import secrets
from typing import Any

import torch
from detectron2.checkpoint import DetectionCheckpointer

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointer", "CheckpointError", "atomic_torch_save", "atomic_write_text", "load_weights_only"]

LAST_CHECKPOINT = "last_checkpoint"
# Periodic and final checkpoints (what --resume may fall back to), newest first by the iteration in the name.
_RESUMABLE = re.compile(r"^model_(\d{7}|final)\.pth$")
# What _atomic_write leaves behind when the process is killed mid-write.
_TEMP_FILE = re.compile(r"^\.(model_\w+\.pth|last_checkpoint)\.\w+\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used (missing, truncated, not a weights-only checkpoint) or
    cannot be written (e.g. the disk is full). The message names the file."""


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable (best effort: some filesystems refuse a dir fsync)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write) -> None:
    """Call `write(f)` on a temp file next to `path`, fsync, rename over `path`, fsync the folder.

    On any failure (exception, KeyboardInterrupt) the temp file is removed and `path` is untouched; a
    hard kill can leave a ``.<name>.*.tmp`` file behind, which nothing reads.
    """
    path = os.path.abspath(path)
    directory, base = os.path.split(path)
    # Exclusive create under a random name (mode 0o666 minus the umask, as a plain open would give the
    # target; mkstemp's 0o600 would make checkpoints unreadable to the rest of a team).
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise CheckpointError(f"cannot write {path}: {reason}; the files saved before are untouched") from exc
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

def load_weights_only(path: str) -> dict:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Raises :class:`CheckpointError` for a missing, empty, truncated or otherwise unreadable file, and
    for a file that needs full unpickling (the message names the type the safe loader refused).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the refused global ("Unsupported global: GLOBAL posix.system").
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it contains {found.group(1)!r}, which" if found else "it contains an object that"
        raise CheckpointError(f"{path}: refused to load: {what} is not a tensor, number, string or container "
                              "(loading it would need full unpickling, which can run code)") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(data).__name__}, expected a dict)")
    return data


def _iteration_key(name: str) -> int:
    m = _RESUMABLE.match(name)
    return 1 << 62 if m.group(1) == "final" else int(m.group(1))


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves, weights-only loads and a resume that falls back.

    * ``save``: the checkpoint and the ``last_checkpoint`` pointer are written atomically. Files whose
      name starts with one of ``untagged_prefixes`` (``model_best``, written by ``BestCheckpointer``)
      do not move the pointer, so ``--resume`` continues from the newest periodic checkpoint.
    * ``_load_file``: ``.pth`` files only, with ``torch.load(weights_only=True)``; detectron2's pickled
      ``.pkl`` model-zoo files are refused, since unpickling them can run arbitrary code.
    * ``resume_or_load(resume=True)``: the file named by ``last_checkpoint`` is validated first; if it is
      missing, empty, truncated or unloadable, a warning names it and the newest loadable
      ``model_*.pth`` of the folder is used instead (``model_final.pth`` counts as the newest).
    """

    untagged_prefixes = ("model_best",)

    # ---- writing -------------------------------------------------------------------------------
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        if not name.startswith(self.untagged_prefixes):
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, LAST_CHECKPOINT))

    # ---- reading -------------------------------------------------------------------------------
    def load(self, path: str, *args, **kwargs) -> dict[str, Any]:
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"{path}: checkpoint not found")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict:
        if filename.endswith((".pkl", ".pyth")):
            raise CheckpointError(f"{filename}: pickled model-zoo files are not loaded (unpickling can run code); "
                                  "convert it to a .pth state_dict saved with torch.save")
        loaded = load_weights_only(filename)
        if "model" not in loaded:  # a bare state_dict
            loaded = {"model": loaded}
        return loaded

    def resumable_files(self) -> list[str]:
        """``model_NNNNNNN.pth`` / ``model_final.pth`` of the save folder, newest first."""
        try:
            names = [n for n in os.listdir(self.save_dir) if _RESUMABLE.match(n)]
        except OSError:
            return []
        return [os.path.join(self.save_dir, n) for n in sorted(names, key=_iteration_key, reverse=True)]

    def has_checkpoint(self) -> bool:
        return super().has_checkpoint() or bool(self.resumable_files())

    def pointed_file(self) -> str:
        """The file named by ``last_checkpoint`` ("" when the pointer is missing, empty or unreadable, or
        names something other than a file of the save folder)."""
        try:
            with open(os.path.join(self.save_dir, LAST_CHECKPOINT), encoding="utf-8") as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError):
            return ""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            if name:
                self.logger.warning("Ignoring %s: it names %r, not a file of %s",
                                    os.path.join(self.save_dir, LAST_CHECKPOINT), name[:100], self.save_dir)
            return ""
        return os.path.join(self.save_dir, name)

    def resume_candidates(self, pointed: str | None = None) -> list[str]:
        """The pointer's target first (if the pointer names one), then the others newest first."""
        pointed = self.pointed_file() if pointed is None else pointed
        ordered = [pointed] if pointed else []
        return ordered + [p for p in self.resumable_files() if p not in ordered]

    def remove_stale_temp_files(self) -> list[str]:
        """Delete the temp files that a killed save leaves (``.model_*.pth.*.tmp``); returns their names."""
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        stale = [n for n in os.listdir(self.save_dir) if _TEMP_FILE.match(n)]
        for name in stale:
            try:
                os.remove(os.path.join(self.save_dir, name))
            except OSError:
                pass
        if stale:
            self.logger.info("Removed %d temp file(s) of interrupted saves: %s", len(stale), ", ".join(stale))
        return stale

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        if resume:
            self.remove_stale_temp_files()
        if not resume or not self.has_checkpoint():
            return self.load(path, checkpointables=[])
        pointed = self.pointed_file()
        for candidate in self.resume_candidates(pointed):
            try:
                checkpoint = self._load_file(candidate)
            except CheckpointError as e:
                self.logger.warning("Skipping a checkpoint on resume: %s", e)
                continue
            if candidate != pointed:
                self.logger.warning("Resuming from %s instead (the newest loadable checkpoint)", candidate)
            return self._load_checkpoint(candidate, checkpoint)
        raise CheckpointError(f"--resume: no loadable checkpoint in {self.save_dir} (every model_*.pth there is "
                              "truncated or unreadable; see the warnings above); remove --resume to start over")

    def _load_checkpoint(self, path: str, checkpoint: dict) -> dict[str, Any]:
        """``Checkpointer.load`` for a file already read (so it is read once)."""
        self.logger.info("[Checkpointer] Loading from %s ...", path)
        incompatible = self._load_model(checkpoint)
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)
        for key in self.checkpointables:
            if key in checkpoint:
                self.logger.info("Loading %s from %s ...", key, path)
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint

    def is_loadable(self, path: str) -> bool:
        try:
            self._load_file(path)
        except CheckpointError:
            return False
        return True

    def ensure_final(self, iteration: int, name: str = "model_final") -> bool:
        """After resuming from the last iteration: make sure ``<name>.pth`` loads and holds `iteration`,
        rewriting it from the loaded state otherwise (a kill while it was written leaves the previous file
        or none, and training does not run again to rewrite it). Returns whether it was rewritten."""
        final = os.path.join(self.save_dir, f"{name}.pth")
        try:
            ok = load_weights_only(final).get("iteration") == iteration
        except CheckpointError as e:
            self.logger.warning("%s", e)
            ok = False
        if not ok:
            self.logger.warning("Rewriting %s from the checkpoint of iteration %d", final, iteration)
            self.save(name, iteration=iteration)
        return not ok

