"""Fixtures for the backbone tests: the manifest, a fixed seed, both deformable-op backends."""

import json
import sys
from pathlib import Path

import pytest
import torch

from stm_backbones import ops

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:  # for bb_test_utils
    sys.path.insert(0, TESTS_DIR)

MANIFEST_PATH = Path(__file__).resolve().parents[3] / "tests" / "data" / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest() -> dict:
    """The reference implementation's state_dict (key, shape, dtype) and parameter count per model."""
    return json.loads(MANIFEST_PATH.read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["dispatch", "pytorch"])
def op_backend(request):
    """Run a test through the default dispatch (the compiled op when built) and through the PyTorch fallback."""
    if request.param == "dispatch":
        yield request.param
        return
    saved = dict(ops._dispatch_state)
    ops._dispatch_state.update(resolved=True, compiled=None, warned=True)
    yield request.param
    ops._dispatch_state.update(saved)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Make every chunked GELU MLP (ops.mlp_gelu) run in several 7-row chunks (the last one shorter),
    with and without autograd."""
    monkeypatch.setattr(ops, "MLP_CHUNK_BYTES", 1)
    monkeypatch.setattr(ops, "_MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(ops, "MLP_CHUNKING_BYTES", 0)
