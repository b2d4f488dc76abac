"""Harness that runs timm's own model test-suite (`tests/test_models.py` of the pinned timm release) on the
micro model of every registered unified family.

timm's test file is not copied into this repository: `test_timm_models.py` fetches the sdist of the installed
timm version once (``pip download --no-deps --no-binary :all: timm==<version>``) into
``${STM_CACHE:-~/.cache/stm}/timm-tests/<version>/`` and runs its ``tests/test_models.py`` with timm's model
lists restricted to ours (`restricted_list_models`). This conftest keeps only the tests parametrised by one of
our models (the others are timm's hand-picked models, not ours) and skips the TorchScript tests: TorchScript
support is not a goal of this project (see the README).
"""

from __future__ import annotations

import fnmatch
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE_FILE = os.path.join(HERE, "test_timm_models.py")

# TorchScript (torch.jit.script) is not supported: the blocks' fast paths use Python features TorchScript cannot
# compile (autograd Functions, caches keyed on devices, keyword-only helpers). torch.export / ONNX are the
# deployment paths (stm_backbones.export).
TORCHSCRIPT_TESTS = ("*torchscript*",)

# timm's markers, registered so that pytest does not warn about them
TIMM_MARKERS = ("base", "cfg", "cfg_nonstd", "forward", "backward", "torchscript", "features", "fxforward",
                "fxbackward")


def pytest_configure(config):
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm test-suite marker (tests/timm_suite)")


def _our_item(item) -> bool | None:
    """True/False for items of the timm suite (whether they test one of our models), None for other items."""
    if os.path.abspath(str(item.fspath)) != SUITE_FILE:
        return None
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("model_name") if callspec is not None else None
    if name is None:
        return False
    from stm_backbones.registry import list_models

    return str(name).split(".")[0] in list_models()


def pytest_collection_modifyitems(config, items):
    kept, deselected = [], []
    for item in items:
        ours = _our_item(item)
        if ours is False:
            deselected.append(item)
            continue
        if ours and any(fnmatch.fnmatch(item.originalname, p) for p in TORCHSCRIPT_TESTS):
            item.add_marker(pytest.mark.skip(reason="TorchScript is not a goal of this project (README: Use with "
                                                    "timm); use torch.export / ONNX (stm_backbones.export)"))
        kept.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
