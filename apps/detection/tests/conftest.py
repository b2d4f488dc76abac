"""Fixtures for the detection app tests: sys.path, an isolated STM_CACHE, config helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
APP_DIR = TESTS_DIR.parent
for _p in (str(APP_DIR), str(TESTS_DIR)):  # the app's package (stm_det) and det_test_utils
    if _p not in sys.path:
        sys.path.insert(0, _p)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Write the shapes set (and anything else under STM_CACHE) inside pytest's temp dir."""
    old = os.environ.get("STM_CACHE")
    os.environ["STM_CACHE"] = str(tmp_path_factory.mktemp("stm_cache_det"))
    yield
    if old is None:
        os.environ.pop("STM_CACHE", None)
    else:
        os.environ["STM_CACHE"] = old


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models are op-overhead bound, and two OpenMP threads competing
    with other processes for 2 cores are several times slower than one. Restored afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def shapes_root(_isolated_cache):
    from stm_det.data import ensure_shapes_dataset

    return ensure_shapes_dataset()
