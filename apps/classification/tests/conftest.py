"""Fixtures for the classification app tests: sys.path, an in-process main(), and a tiny dataset."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
APP_DIR = TESTS_DIR.parent
for _p in (str(APP_DIR), str(TESTS_DIR)):  # the app's package and cls_test_utils
    if _p not in sys.path:
        sys.path.insert(0, _p)

from cls_test_utils import MAIN_PY, write_list_dataset  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the digits cache (and anything else under STM_CACHE) inside pytest's temp dir."""
    old = os.environ.get("STM_CACHE")
    os.environ["STM_CACHE"] = str(tmp_path_factory.mktemp("stm_cache"))
    yield
    if old is None:
        os.environ.pop("STM_CACHE", None)
    else:
        os.environ["STM_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread for the in-process runs: on a shared, oversubscribed CPU, OpenMP threads that
    spin-wait for each other make tiny models ~50x slower (measured 0.12 s vs 5.9 s per step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


