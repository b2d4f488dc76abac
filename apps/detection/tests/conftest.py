"""Fixtures for the detection app tests: sys.path, an isolated STM_CACHE, config helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
APP_DIR = TESTS_DIR.parent
for _p in (str(APP_DIR), str(TESTS_DIR), str(APP_DIR.parents[1] / "tests")):  # stm_det, det_test_utils, app_fixtures
    if _p not in sys.path:
        sys.path.insert(0, _p)

from app_fixtures import _isolated_cache, _one_torch_thread  # noqa: E402,F401  (autouse fixtures)


@pytest.fixture(scope="session")
def shapes_root():  # after the session-scoped autouse _isolated_cache
    from stm_det.data import ensure_shapes_dataset

    return ensure_shapes_dataset()
