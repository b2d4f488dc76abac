"""Fixtures for the classification app tests: sys.path, an in-process main(), and a tiny dataset."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
APP_DIR = TESTS_DIR.parent
for _p in (str(APP_DIR), str(TESTS_DIR), str(APP_DIR.parents[1] / "tests")):  # stm_cls, cls_test_utils, app_fixtures
    if _p not in sys.path:
        sys.path.insert(0, _p)

from app_fixtures import _isolated_cache, _one_torch_thread  # noqa: E402,F401  (autouse fixtures)
from cls_test_utils import MAIN_PY, write_list_dataset  # noqa: E402


@pytest.fixture(scope="session")
def cls_main():
    """apps/classification/main.py imported as a module (its main(argv) returns the exit code)."""
    spec = importlib.util.spec_from_file_location("stm_cls_main", MAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Read-only shared tiny list-layout dataset (4 classes, 32 train, 15 val images)."""
    return write_list_dataset(tmp_path_factory.mktemp("tiny") / "data")


