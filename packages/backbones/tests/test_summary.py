"""The summary CLI: params and fvcore FLOPs against the reference's numbers in the manifest; the operators
that fvcore does not count (pooling of a new mixer included) are named."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import stm_backbones
from stm_backbones import MixerBlock
from stm_backbones.summary import format_summary, not_counted, summarize

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


class _TestPoolBlock(MixerBlock):
    """A pooling mixer for these tests only (PoolFormer-like): x + proj(avg_pool(x) + max_pool(x) - 2x)."""

    def __init__(self, dim, drop_path=0.0, **kwargs):
        super().__init__()
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.max = nn.MaxPool2d(3, stride=1, padding=1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return x + self.proj(self.avg(x) + self.max(x) - 2 * x)


@pytest.fixture(scope="module")
def testpool_model():
    """`unified_testpool_micro`, registered on first use (after collection: the shared tests' lists, taken from
    the registry at collection, do not pick this test-only mixer up)."""
    if "testpool" not in {family.name for family in stm_backbones.list_families()}:
        stm_backbones.register_mixer("testpool", _TestPoolBlock,
                                     {"micro": dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1))})
    return stm_backbones.get_family("testpool").smallest


def test_pooling_of_a_new_mixer_is_reported_as_not_counted(testpool_model):
    report = summarize(testpool_model, img_size=64)
    assert report["not_counted"]["aten::avg_pool2d"] == 4  # one block per stage
    assert report["not_counted"]["aten::max_pool2d"] == 4
    assert "aten::add" not in report["not_counted"] and "aten::mul" not in report["not_counted"]
    text = format_summary(report)
    assert re.search(r"not counted .*aten::avg_pool2d x4.*aten::max_pool2d x4", text), text


def test_not_counted_keeps_every_non_elementwise_operator():
    uncounted = {"aten::add": 5, "aten::mul_": 2, "aten::gelu": 3, "aten::_unsafe_view": 1, "aten::__and__": 1,
                 "aten::avg_pool2d": 4, "aten::max_pool2d": 1, "aten::adaptive_max_pool2d": 1, "aten::softmax": 2,
                 "aten::upsample_bicubic2d": 1, "aten::grid_sampler_3d": 1, "aten::mean": 1,
                 "prim::PythonOp.MSDeformAttnFunction": 4, "stm_cuda_ops::ms_deform_attn": 4}
    assert not_counted(uncounted) == {
        "aten::avg_pool2d": 4, "aten::max_pool2d": 1, "aten::adaptive_max_pool2d": 1, "aten::softmax": 2,
        "aten::upsample_bicubic2d": 1, "aten::grid_sampler_3d": 1, "aten::mean": 1,
        "prim::PythonOp.MSDeformAttnFunction": 4, "stm_cuda_ops::ms_deform_attn": 4}
