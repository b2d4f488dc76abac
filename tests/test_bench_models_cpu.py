"""The model benchmark runs end to end (tiny settings) and reports ratios against the yardstick.

Only the structure of the results is asserted (rows, ratios computed from the stored times, profiles that
contain what they must), never a time: the test holds on a busy machine. The settings are the smallest
that exercise every code path (64 px, the least at which resnet50's last BatchNorm sees more than one value per
channel in a batch-1 training step; batch 1, one repeat), so the run stays short under load too.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_models_cpu.py"


def test_bench_writes_ratios_against_the_yardstick(tmp_path):
    out = tmp_path / "results"
    subprocess.run([sys.executable, str(BENCH), "--models", "unified_convnext_micro", "--modes", "eager", "bf16", "onnxruntime",
                    "--size", "64", "--batch", "1", "--repeats", "1", "--results-dir", str(out)],
                   check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    results = json.loads((out / "models_cpu.json").read_text())
    rows = results["rows"]
    by = {(r["model"], r["mode"]): r for r in rows}
    assert set(by) == {(m, mode) for m in ("unified_convnext_micro", "resnet50")
                       for mode in ("eager", "bf16", "onnxruntime")}
    ort = by[("unified_convnext_micro", "onnxruntime")]  # inference only, against the eager yardstick
    assert "error" not in ort, ort
    assert ort["eval_s"] > 0 and ort["yardstick_eval_s"] > 0 and "train_s" not in ort
    for mode in ("eager", "bf16"):
        row = by[("unified_convnext_micro", mode)]
        assert "error" not in row, row
        assert all(row[k] > 0 for k in ("eval_s", "train_s", "yardstick_eval_s", "yardstick_train_s"))
        # the yardstick's own row is its best time over the rounds it ran beside the models
        assert by[("resnet50", mode)]["eval_s"] == row["yardstick_eval_s"]  # (one model: its only rounds)
    assert by[("unified_convnext_micro", "eager")]["train_peak_mib"] > 0
    table = (out / "models_cpu.md").read_text()
    line = next(row for row in table.splitlines() if row.startswith("| unified_convnext_micro"))
    eager = by[("unified_convnext_micro", "eager")]
    assert f"| {eager['eval_s'] / eager['yardstick_eval_s']:.2f} |" in line
    # profiles: dense work (GEMMs, convolutions) is part of every step, never more than the whole
    for name in ("unified_convnext_micro", "resnet50"):
        for phase, suffix in (("eval", "eval_forward"), ("train", "train_step")):
            prof = results["profiles"][name][phase]
            assert 0 < prof["dense_ms"] < prof["total_ms"]
            assert "aten::" in (out / "profiles" / f"{name}_{suffix}.txt").read_text()
    assert "| unified_convnext_micro | " in table.split("Dense work")[1]
    ort_line = next(r for r in table.split("onnxruntime (CPU provider")[1].splitlines()
                    if r.startswith("| unified_convnext_micro"))
    assert f"| {ort['eval_s'] / ort['yardstick_eval_s']:.2f} |" in ort_line
