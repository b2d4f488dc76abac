"""Repository-wide test set-up: every test starts from the same random state.

Tests draw their inputs from torch/numpy/random; seeding before each test makes every input, and so
every comparison, the same on every run and machine, whatever ran before it (a test that passes alone
must pass in the suite, and the other way round).
"""

from __future__ import annotations

import random

import pytest


@pytest.fixture(autouse=True)
def _seed_every_test():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
