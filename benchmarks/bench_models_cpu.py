"""CPU throughput of every tiny model, as ratios to torchvision's resnet50 timed in the same run.

For each model (and resnet50, the yardstick): eval forward (`no_grad`, `eval()`) and one training
step (forward + backward of `out.sum()`, `train()`), batch 8, 224 px, 2 threads, best of 3 after a
warm-up; in three columns: eager float32, `torch.compile`, bf16 autocast. Peak memory of the
training step is the peak RSS increase of a fresh process over one eager step.

All timings come from this one process (the yardstick is timed in the same run, so ratios survive a
noisy shared machine); only the peak-memory reading uses a fresh child process per model.
Writes benchmarks/results/models_cpu.{json,md}.

    python benchmarks/bench_models_cpu.py [--models unified_swin_tiny ...] [--modes eager compile bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TINY_MODELS = ["unified_convnext_tiny", "unified_halo_tiny", "unified_pvt_tiny", "unified_swin_tiny",
               "unified_dcn_v3_tiny"]
YARDSTICK = "resnet50"
MODES = ["eager", "compile", "bf16"]
# The study's reference implementation measured the same way (eager float32; DCNv3 through its only
# CPU-capable path, the grid_sample formulation), as given in the fast-paths issue.
REFERENCE_RATIOS = {
    "unified_convnext_tiny": (1.05, 1.26), "unified_halo_tiny": (2.10, 2.06), "unified_pvt_tiny": (1.16, 1.06),
    "unified_swin_tiny": (1.52, 1.19), "unified_dcn_v3_tiny": (2.79, 2.58),
}


def _build(name: str):
    import timm
    import torch

    import stm_backbones  # noqa: F401  (registers the models)

    torch.manual_seed(0)
    if name == YARDSTICK:
        import torchvision

        return torchvision.models.resnet50()
    return timm.create_model(name)


def time_model(name: str, mode: str, batch: int, size: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds of an eval forward and of a training step, after a warm-up."""
    import torch

    torch._dynamo.reset()
    model = _build(name)
    image = torch.randn(batch, 3, size, size)
    runner = torch.compile(model) if mode == "compile" else model

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "bf16"))

    def eval_forward():
        model.eval()
        with torch.no_grad(), autocast():
            runner(image)

    def train_step():
        model.train()
        with autocast():
            out = runner(image)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    def best_of(fn):
        fn()  # warm-up (compiles under torch.compile)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return dict(model=name, mode=mode, eval_s=best_of(eval_forward), train_s=best_of(train_step))


def peak_train_memory_mib(name: str, mode: str, batch: int, size: int) -> float:
    """Peak RSS increase of one training step, measured in a fresh child process."""
    code = (
        "import resource, sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "from bench_models_cpu import _build\n"
        "torch.set_num_threads(2)\n"
        "model = _build(%r).train(); image = torch.randn(%d, 3, %d, %d)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16, enabled=%r):\n"
        "    out = model(image)\n"
        "out.float().sum().backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    ) % (str(Path(__file__).resolve().parent), name, batch, size, size, mode == "bf16")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    return float(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else float("nan")


def _table(rows: list[dict], modes: list[str]) -> str:
    by = {(r["model"], r["mode"]): r for r in rows}
    header = ["model"]
    for mode in modes:
        header += [f"eval/rn50 {mode}", f"train/rn50 {mode}"]
    header += ["ref eval/rn50", "ref train/rn50", "eager speed-up vs ref (eval, train)", "train peak MiB (eager)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in [n for n in TINY_MODELS if any(k[0] == n for k in by)]:
        cells = [name]
        for mode in modes:
            own, base = by.get((name, mode), {}), by.get((YARDSTICK, mode), {})
            if "eval_s" in own and "eval_s" in base:
                cells += [f"{own['eval_s'] / base['eval_s']:.2f}", f"{own['train_s'] / base['train_s']:.2f}"]
            else:
                cells += ["error", "error"]
        ref = REFERENCE_RATIOS.get(name)
        eager, base = by.get((name, "eager"), {}), by.get((YARDSTICK, "eager"), {})
        if ref and "eval_s" in eager and "eval_s" in base:
            speedup = (ref[0] / (eager["eval_s"] / base["eval_s"]), ref[1] / (eager["train_s"] / base["train_s"]))
            cells += [f"{ref[0]:.2f}", f"{ref[1]:.2f}", f"{speedup[0]:.2f}x, {speedup[1]:.2f}x",
                      f"{eager['train_peak_mib']:.0f}"]
        else:
            cells += ["-", "-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    base_cells = [f"{by[(YARDSTICK, m)]['eval_s'] * 1000:.0f} ms / {by[(YARDSTICK, m)]['train_s'] * 1000:.0f} ms"
                  for m in modes if "eval_s" in by.get((YARDSTICK, m), {})]
    lines.append("")
    lines.append(f"resnet50 absolute (eval / train step) per mode {modes}: " + "; ".join(base_cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=TINY_MODELS)
    parser.add_argument("--modes", nargs="*", default=MODES, choices=MODES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rows = []
    for mode in args.modes:
        # The yardstick is timed in the same process, right before the models of each mode.
        for name in [YARDSTICK, *args.models]:
            try:
                row = time_model(name, mode, args.batch, args.size, args.repeats)
                if mode == "eager":
                    row["train_peak_mib"] = peak_train_memory_mib(name, mode, args.batch, args.size)
            except Exception as error:  # noqa: BLE001 - a failing model is reported, not fatal
                row = dict(model=name, mode=mode, error=f"{type(error).__name__}: {error}"[:300])
            print(json.dumps(row), flush=True)
            rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = dict(machine=platform.processor() or platform.machine(), threads=2, batch=args.batch, size=args.size,
                repeats=args.repeats, torch=torch.__version__,
                note="ratio = model time / resnet50 time, both timed in this one process run")
    (RESULTS / "models_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    table = _table(rows, args.modes)
    (RESULTS / "models_cpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
