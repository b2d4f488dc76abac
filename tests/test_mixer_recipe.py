"""The README's "Adding a new token mixer" example, run as a user would through every entry point.

The example file and its registration line are read from README.md itself (so the README cannot drift from
what works), written to a temporary `my_pool_mixer.py` and made visible with `STM_MIXERS`. Every check runs in
a subprocess, as a user's own process would, which also keeps the test-only mixer out of this process's registry.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from app_fixtures import _isolated_cache  # noqa: E402,F401  (autouse: the digits / shapes data in a temp cache)


def recipe_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("## Adding a new token mixer")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else len(text)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def recipe_env(tmp_path_factory):
    blocks = recipe_blocks()
    assert len(blocks) == 2, "the README section should hold the mixer file and its registration line"
    file_text, registration = blocks
    assert "class PoolBlock(MixerBlock)" in file_text
    assert registration.strip().count("\n") == 0, "registration is one line"
    path = tmp_path_factory.mktemp("recipe") / "my_pool_mixer.py"
    path.write_text(file_text + "\n" + registration)
    return dict(os.environ, STM_MIXERS=str(path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(args, env, cwd=ROOT, timeout=900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def test_timm_features_dense_and_summary(recipe_env):
    script = textwrap.dedent("""
        import timm, torch, stm_backbones
        from timm.layers import DropPath

        family = stm_backbones.get_family("pool")
        assert family.models() == ["unified_pool_micro", "unified_pool_tiny"] and not family.study
        assert "unified_pool_micro" in stm_backbones.list_models()

        model = timm.create_model("unified_pool_micro", num_classes=10, drop_path_rate=0.1, img_size=64)
        rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
        assert abs(max(rates) - 0.1) < 1e-6, rates   # drop_path_rate= reaches the blocks
        assert model.img_size == (64, 64) and model.stages[0][0].pool.kernel_size == 3
        x = torch.randn(2, 3, 64, 64)
        out = model(x)
        assert out.shape == (2, 10), out.shape
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

        features = timm.create_model("unified_pool_micro", features_only=True).eval()
        maps = features(torch.randn(1, 3, 64, 96))
        assert [tuple(m.shape[1:]) for m in maps] == [(32, 16, 24), (64, 8, 12), (128, 4, 6), (256, 2, 3)]
        assert features.feature_info.reduction() == [4, 8, 16, 32]

        dense = stm_backbones.create_dense_backbone("unified_pool_micro").eval()
        assert abs(max(m.drop_prob for m in dense.modules() if isinstance(m, DropPath)) - 0.1) < 1e-6
        maps = dense(torch.randn(1, 3, 96, 160))
        assert [tuple(m.shape[-2:]) for m in maps] == [(24, 40), (12, 20), (6, 10), (3, 5)]
        print("ok")
    """)
    assert run(["-c", script], recipe_env).stdout.strip().endswith("ok")

    summary = run(["-m", "stm_backbones.summary", "unified_pool_micro", "--img-size", "64"], recipe_env).stdout
    assert "unified_pool_micro" in summary and "FLOPs" in summary
    assert re.search(r"not counted .*avg_pool2d", summary), summary  # the pooling is named, not silently left out
    table = run(["-m", "stm_backbones.summary", "--all", "--img-size", "64"], recipe_env).stdout
    assert "| unified_pool_micro |" in table and "| unified_pool_tiny |" in table


def test_shared_contract_tests_cover_the_new_mixer(recipe_env):
    tests = ROOT / "packages" / "backbones" / "tests"
    proc = run(["-m", "pytest", tests / "test_models_common.py", tests / "test_fast_paths_all.py", "-k", "pool",
                "-v"], recipe_env)
    ran = re.findall(r"::(\w+)\[[^\]]*pool[^\]]*\] PASSED", proc.stdout)
    assert "test_fast_path_equals_plain_formulation" in ran, proc.stdout[-3000:]
    assert len([name for name in ran if name != "test_fast_path_equals_plain_formulation"]) >= 3, ran
    assert " failed" not in proc.stdout
    # adding a mixer breaks none of the study's checks
    run(["-m", "pytest", tests / "test_manifest.py", "-q"], recipe_env)


def test_one_digits_epoch_of_the_classification_app(recipe_env, tmp_path):
    out = tmp_path / "pool_digits"
    run([ROOT / "apps" / "classification" / "main.py", "--model", "unified_pool_micro", "--epochs", "1",
         "--num_workers", "0", "--output_dir", out], recipe_env)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if line.strip()]
    assert len(log) == 1
    # it learns: one epoch of the digits takes it far above chance (10%); measured 81% (train loss 1.48 < ln 10)
    assert log[0]["train_loss"] < math.log(10) and log[0]["test_acc1"] > 40.0, log[0]
    assert any(out.glob("checkpoint*.pth"))


def test_a_few_iterations_of_the_detection_app(recipe_env, tmp_path):
    app = ROOT / "apps" / "detection"
    out = tmp_path / "pool_det"
    run([app / "train_net.py", "--config-file", app / "configs" / "demo_shapes_unified_convnext_micro.yaml",
         "MODEL.UNIFIED.NAME", "unified_pool_micro", "MODEL.DEVICE", "cpu",
         "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
         "INPUT.MAX_SIZE_TEST", "96", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(2,)",
         "SOLVER.CHECKPOINT_PERIOD", "100", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
         "DATALOADER.NUM_WORKERS", "0", "TEST.VIS_IMAGES", "0", "OUTPUT_DIR", out], recipe_env, cwd=tmp_path)
    assert (out / "model_final.pth").exists()
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
