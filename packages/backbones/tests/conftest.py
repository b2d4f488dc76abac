"""Fixtures for the backbone tests: the manifest, a fixed seed, both deformable-op backends."""

import json
import sys
from pathlib import Path

import pytest
import torch

import stm_cuda_ops
from stm_backbones.fast import mlp as fast_mlp

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


@pytest.fixture(params=["dispatch", "reference"])
def op_backend(request):
    """Run a test through the default dispatch (the compiled op when built) and through stm_cuda_ops'
    pure-PyTorch reference (the fallback when the extension is not built)."""
    if request.param == "dispatch":
        yield request.param
        return
    with stm_cuda_ops.use_reference():
        yield request.param


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Make every chunked GELU MLP (fast.mlp.mlp_gelu) run in several 7-row chunks (the last one shorter),
    with and without autograd."""
    monkeypatch.setattr(fast_mlp, "MLP_CHUNK_BYTES", 1)
    monkeypatch.setattr(fast_mlp, "_MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(fast_mlp, "MLP_CHUNKING_BYTES", 0)
