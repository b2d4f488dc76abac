"""Mixers from outside the package: importing `stm_backbones` also imports

* every module named in the environment variable `STM_MIXERS` (comma-separated; a module name such as
  `my_lab.pool_mixer`, or the path of a `.py` file), and
* every entry point of the group `stm_backbones.mixers` of the installed distributions,

so that a mixer registered there (`register_mixer(...)`) is a timm model in every process: the apps, their
worker processes and torchrun ranks included.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

ENV_VAR = "STM_MIXERS"
ENTRY_POINT_GROUP = "stm_backbones.mixers"


class MixerPluginError(ImportError):
    """A mixer module named in STM_MIXERS (or an entry point) could not be imported."""


def _import_path(path: Path):
    name = f"stm_mixer_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # registration looks the module up while it executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_plugins() -> list[str]:
    """Import the mixer modules of STM_MIXERS and of the entry points; returns what was imported."""
    loaded = []
    for entry in filter(None, (e.strip() for e in os.environ.get(ENV_VAR, "").split(","))):
        try:
            if entry.endswith(".py"):
                path = Path(entry).expanduser()
                if not path.is_file():
                    raise FileNotFoundError(f"no such file: {path}")
                _import_path(path.resolve())
            else:
                importlib.import_module(entry)
        except Exception as error:
            raise MixerPluginError(f"{ENV_VAR}: could not import the mixer module {entry!r}: "
                                   f"{type(error).__name__}: {error}") from error
        loaded.append(entry)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:
            raise MixerPluginError(f"entry point {entry_point.name!r} ({entry_point.value}) of group "
                                   f"{ENTRY_POINT_GROUP}: {type(error).__name__}: {error}") from error
        loaded.append(entry_point.value)
    return loaded
