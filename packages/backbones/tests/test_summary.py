"""The summary CLI: params and fvcore FLOPs against the reference's numbers in the manifest."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stm_backbones.summary import summarize

MANIFEST = json.loads((Path(__file__).resolve().parents[3] / "tests" / "data" / "state_dict_manifest.json").read_text())
CHECKED = [n for n in MANIFEST if n.endswith("_micro") or n.startswith("official_")] + ["unified_swin_tiny"]


@pytest.mark.parametrize("name", CHECKED)
def test_params_and_flops_match_reference(name):
    report = summarize(name)
    assert report["params"] == MANIFEST[name]["params"]
    assert report["gflops"] == pytest.approx(MANIFEST[name]["gflops_fvcore"], abs=6e-4, rel=1e-3)
    assert [s[-1] for s in report["stage_shapes"]] == [56, 28, 14, 7]


def test_cli_prints_table():
    result = subprocess.run([sys.executable, "-m", "stm_backbones.summary", "unified_convnext_micro"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4,439,624" in result.stdout and "0.658" in result.stdout and "(1, 256, 7, 7)" in result.stdout


def test_cli_unknown_model():
    result = subprocess.run([sys.executable, "-m", "stm_backbones.summary", "unified_nope_micro"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown model" in result.stderr
