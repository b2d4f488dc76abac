import json
from pathlib import Path

import pytest

MANIFEST_PATH = Path(__file__).resolve().parents[3] / "tests" / "data" / "state_dict_manifest.json"


@pytest.fixture(scope="session")
def manifest() -> dict:
    """The reference implementation's state_dict (key, shape, dtype) and parameter count per model."""
    return json.loads(MANIFEST_PATH.read_text())
