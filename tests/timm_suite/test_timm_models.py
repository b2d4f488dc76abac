"""timm's own `tests/test_models.py` (of the installed, pinned timm release) run on our models.

The file is fetched from timm's sdist at test time (cached under ``${STM_CACHE:-~/.cache/stm}/timm-tests``),
never copied into this repository, and executed in this module's namespace with timm's model lists restricted
to the micro model of every registered unified family. See conftest.py for what is deselected and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile

import pytest
import timm

import stm_backbones
from stm_backbones.cache import cache_root

# the micro model of every registered unified family (one per mixer, plus the PVT-v2 variant)
OUR_MODELS = sorted(n for n in stm_backbones.list_models() if n.startswith("unified_") and n.endswith("_micro"))


def timm_test_models_path(version: str = timm.__version__) -> str:
    """Path of tests/test_models.py of timm `version`, fetched once from its sdist into the cache (atomically)."""
    folder = os.path.join(cache_root(), "timm-tests", version)
    target = os.path.join(folder, "test_models.py")
    if os.path.isfile(target):
        return target
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"timm=={version}", "-d", tmp], check=True, timeout=600)
        sdist = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".tar.gz"))
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/tests/test_models.py"))
            data = archive.extractfile(member).read()
        partial = os.path.join(tmp, "test_models.py")
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, target)
    return target


_ORIGINAL_LIST_MODELS = timm.list_models


def restricted_list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                           include_tags=None):
    """timm.list_models limited to OUR_MODELS. A `module=` filter names timm modules whose models implement
    forward_intermediates / the FeatureGetterNet wrapper; every one of our models does, so it selects ours."""
    names = _ORIGINAL_LIST_MODELS(filter=filter or "", pretrained=pretrained, exclude_filters=exclude_filters or "",
                                  name_matches_cfg=name_matches_cfg, include_tags=include_tags)
    return [n for n in names if n.split(".")[0] in OUR_MODELS]


def restricted_list_pretrained(filter="", exclude_filters=""):
    return restricted_list_models(filter=filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


try:
    _SUITE = timm_test_models_path()
except (subprocess.SubprocessError, OSError, StopIteration) as error:  # offline machine with an empty cache
    pytest.skip(f"cannot fetch timm {timm.__version__}'s sdist for its test-suite: {error}", allow_module_level=True)

with open(_SUITE) as _f:
    _SOURCE = _f.read()
timm.list_models, _saved_pretrained = restricted_list_models, timm.list_pretrained
timm.list_pretrained = restricted_list_pretrained
try:
    exec(compile(_SOURCE, _SUITE, "exec"), globals())  # noqa: S102 - timm's pinned test file, fetched from its sdist
finally:
    timm.list_models, timm.list_pretrained = _ORIGINAL_LIST_MODELS, _saved_pretrained
