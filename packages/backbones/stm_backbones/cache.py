"""The project's cache folder, ``${STM_CACHE:-~/.cache/stm}``: downloaded checkpoints and the small datasets
the apps generate once. Shared by the packages and the apps so they agree on one place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

__all__ = ["cache_root", "ensure_versioned_dir"]


def cache_root() -> str:
    """``$STM_CACHE`` if set and non-empty, else ``~/.cache/stm`` (user-expanded, not created)."""
    return os.path.expanduser(os.environ.get("STM_CACHE") or os.path.join("~", ".cache", "stm"))


def _has_version(root: str, version: str) -> bool:
    try:
        with open(os.path.join(root, "VERSION")) as f:
            return f.read().strip() == version
    except OSError:
        return False


def ensure_versioned_dir(name: str, version: str, write: Callable[[str], None]) -> tuple[str, bool]:
    """``(cache_root()/name, written)``: the folder, filled by ``write(folder)`` first unless it already
    holds ``version`` (in its VERSION file, written last).

    Atomic: ``write`` fills a temp folder beside it, which is then renamed, so a crash never leaves a
    half-written folder that looks complete. Concurrent writers (several ranks or runs) are safe: whoever
    renames first wins and the others discard their copy (``written`` is False for them). A folder of
    another version is replaced, so a bumped version rebuilds a stale cache instead of reusing it.
    """
    root = os.path.join(cache_root(), name)
    if _has_version(root, version):
        return root, False
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(root))
    try:
        write(tmp)
        with open(os.path.join(tmp, "VERSION"), "w") as f:
            f.write(version + "\n")
        if os.path.exists(root) and not _has_version(root, version):
            shutil.rmtree(root, ignore_errors=True)  # an older format, or an interrupted foreign folder
        try:
            os.rename(tmp, root)
            return root, True
        except OSError:
            if not _has_version(root, version):
                raise
            return root, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
