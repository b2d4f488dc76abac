"""CPU throughput of every tiny model, as ratios to torchvision's resnet50 timed in the same run.

For each model (and resnet50, the yardstick): eval forward (`no_grad`, `eval()`) and one training
step (forward + backward of `out.sum()`, `train()`), batch 8, 224 px, 2 threads, best of 3 after a
warm-up; in three columns: eager float32, `torch.compile`, bf16 autocast. Peak memory of the
training step is the peak resident-memory increase of a fresh process over one eager step.
A fourth mode, `onnxruntime`, times the eval forward of the model exported to ONNX
(`stm_backbones.export`, dynamic batch) in onnxruntime's CPU provider with the same batch and 2 intra-op
threads, against the same yardstick (resnet50 in eager PyTorch): what a user deploying on a CPU would run
instead, so `eager / onnxruntime` is the ratio to know. It has no training step.

All timings come from this one process, and the yardstick is timed right before and right after each
model, so each ratio compares steps taken under the same load of a shared, noisy machine; only the
peak-memory reading uses a fresh child process per model.
Writes benchmarks/results/models_cpu.{json,md} and profiles/ (eager eval forward and training step per model).

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
MODES = ["eager", "compile", "bf16", "onnxruntime"]
ORT_MODE = "onnxruntime"  # eval forward only, yardstick in eager PyTorch
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


class _Steps:
    """A model's eval forward and training step in one mode (eager, compile or bf16), as callables."""

    def __init__(self, name: str, mode: str, batch: int, size: int, threads: int = 2):
        import torch

        self.model = _build(name)
        self.image = torch.randn(batch, 3, size, size)
        self.runner = torch.compile(self.model) if mode == "compile" else self.model
        self.bf16 = mode == "bf16"
        self.session = _onnx_session(self.model, self.image, threads) if mode == ORT_MODE else None
        self._image_np = self.image.numpy()

    def _autocast(self):
        import torch

        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def eval_forward(self) -> None:
        import torch

        if self.session is not None:
            self.session.run(None, {"x": self._image_np})
            return
        self.model.eval()
        with torch.no_grad(), self._autocast():
            self.runner(self.image)

    def train_step(self) -> None:
        if self.session is not None:
            raise NotImplementedError("onnxruntime runs inference only")
        self.model.train()
        with self._autocast():
            out = self.runner(self.image)
        out.float().sum().backward()
        self.model.zero_grad(set_to_none=True)

    def step(self, phase: str):
        """The eval forward (`phase="eval"`) or the training step (`"train"`)."""
        return self.eval_forward if phase == "eval" else self.train_step

    def phases(self) -> tuple[str, ...]:
        return ("eval",) if self.session is not None else ("eval", "train")


def _onnx_session(model, image, threads: int):
    """`model` exported to ONNX (stm_backbones.export: dynamic batch, DCNv3 as grid_sample) in a temporary file,
    loaded into an onnxruntime CPU session with `threads` intra-op threads (PyTorch's count) and one inter-op."""
    import tempfile

    import onnxruntime

    from stm_backbones import export as stm_export

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        stm_export.export(model, "onnx", path, image, dynamic_hw=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compiles under torch.compile; settles the allocator for this model)
    return min(_seconds(fn) for _ in range(repeats))


def time_against_yardstick(name: str, yardstick: _Steps, mode: str, batch: int, size: int, repeats: int) -> dict:
    """Best-of-`repeats` seconds of `name`'s eval forward and training step after a warm-up, with the
    yardstick's same step timed the same way right before and right after (the mean of the two, which
    cancels a load that drifts linearly): the two see the same load of a shared machine, so their ratio
    is robust (a yardstick timed once per run drifts with the load). Steps are not alternated one by one:
    each model's allocations would then reshape the other's heap (glibc reuses freed memory below its mmap
    threshold), which a training loop never sees."""
    steps = _Steps(name, mode, batch, size)
    row = dict(model=name, mode=mode)
    for phase in steps.phases():
        own, base = steps.step(phase), yardstick.step(phase)
        before = _best_of(base, repeats)
        row[f"{phase}_s"] = _best_of(own, repeats)
        row[f"yardstick_{phase}_s"] = (before + _best_of(base, repeats)) / 2
    return row


def forward_gmacs(name: str, size: int) -> float:
    """fvcore's count (multiply-adds) of one 1-image eval forward, in G: the work a step must do."""
    import torch

    from stm_backbones.summary import count_flops

    torch.manual_seed(0)
    return count_flops(_build(name), torch.randn(1, 3, size, size))[0] / 1e9


def gemm_peak_gmacs(threads: int = 2) -> dict:
    """Best-of-5 multiply-add rate of a 2048^3 matrix product (float32 and bfloat16): the machine's ceiling
    for the GEMM-shaped work that dominates every model here."""
    import torch

    torch.set_num_threads(threads)
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        best = _best_of(lambda: a @ b, 5)  # noqa: B023 - called right here, in this iteration
        rates[str(dtype).removeprefix("torch.")] = 2048 ** 3 / best / 1e9
    return rates


# Operators doing the dense multiply-add work (GEMMs, oneDNN convolutions, fused attention) and their backward.
DENSE_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
             "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_step(name: str, phase: str, batch: int, size: int, rows: int = 15) -> dict:
    """torch.profiler view of one eager float32 eval forward (`phase="eval"`) or training step: the table
    of the top `rows` operators by self CPU time, the step's total self time and that of `DENSE_OPS`."""
    from torch.profiler import ProfilerActivity, profile

    step = _Steps(name, "eager", batch, size).step(phase)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    return dict(table=events.table(sort_by="self_cpu_time_total", row_limit=rows),
                total_ms=sum(e.self_cpu_time_total for e in events) / 1e3,
                dense_ms=sum(e.self_cpu_time_total for e in events if e.key in DENSE_OPS) / 1e3)


def _dense_table(profiles: dict) -> str:
    """Per model and phase: the dense-op time of its profiled eager step, its share of the step, and that
    time over resnet50's whole profiled step: the ratio the model would reach if everything else were free."""
    base = profiles[YARDSTICK]
    lines = ["| model | eval: dense-op ms (share) | eval: dense ms / rn50 eval | "
             "train: dense-op ms (share) | train: dense ms / rn50 train |", "|---|---|---|---|---|"]
    for name, phases in profiles.items():
        cells = [name]
        for phase in ("eval", "train"):
            prof = phases[phase]
            cells += [f"{prof['dense_ms']:.0f} ({prof['dense_ms'] / prof['total_ms']:.0%})",
                      f"{prof['dense_ms'] / base[phase]['total_ms']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peak_train_memory_mib(name: str, mode: str, batch: int, size: int) -> float:
    """Peak resident-memory increase of one training step over the resting process, in a fresh child.

    Read from /proc/self/status: VmHWM (the high-water mark of this process image; unlike getrusage's
    ru_maxrss it is not inherited from the parent across exec) after the step, minus VmRSS before it.
    """
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, %r)\n"
        "from bench_models_cpu import _build\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "    return int(line.split()[1]) / 1024\n"
        "torch.set_num_threads(2)\n"
        "model = _build(%r).train(); image = torch.randn(%d, 3, %d, %d)\n"
        "before = status('VmRSS')\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16, enabled=%r):\n"
        "    out = model(image)\n"
        "out.float().sum().backward()\n"
        "print(status('VmHWM') - before)\n"
    ) % (str(Path(__file__).resolve().parent), name, batch, size, size, mode == "bf16")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="2"))
    if result.returncode != 0:
        raise RuntimeError(f"peak-memory child for {name} failed: {result.stderr[-500:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _work_and_memory(name: str, batch: int, size: int) -> dict:
    """The eager row's extras: batch, multiply-adds per image and the training step's peak memory."""
    return dict(batch=batch, gmacs=forward_gmacs(name, size),
                train_peak_mib=peak_train_memory_mib(name, "eager", batch, size))


def _rate_cells(row: dict) -> list[str]:
    """fvcore multiply-adds per image and the rates reached (a training step counted as 3 forwards)."""
    if "gmacs" not in row or "eval_s" not in row:
        return ["-", "-"]
    work = row["gmacs"] * row["batch"]
    return [f"{row['gmacs']:.2f}", f"{work / row['eval_s']:.0f}, {3 * work / row['train_s']:.0f}"]


def _ratios(row: dict) -> tuple[float, float | None] | None:
    """(eval, train) time / the yardstick's time measured in the same rounds (train None: inference-only mode)."""
    if "eval_s" not in row or "yardstick_eval_s" not in row:
        return None
    train = row["train_s"] / row["yardstick_train_s"] if "train_s" in row else None
    return row["eval_s"] / row["yardstick_eval_s"], train


def _cells(ratios) -> list[str]:
    if not ratios:
        return ["error", "error"]
    return [f"{r:.2f}" if r is not None else "-" for r in ratios]


def _ort_table(rows: list[dict]) -> str:
    """Eager PyTorch against onnxruntime, eval forward, each as a ratio to the yardstick of its own rounds."""
    by = {(r["model"], r["mode"]): r for r in rows}
    lines = ["| model | eager eval/rn50 | onnxruntime eval/rn50 | eager / onnxruntime |", "|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] != YARDSTICK):
        eager, ort = _ratios(by.get((name, "eager"), {})), _ratios(by.get((name, ORT_MODE), {}))
        cells = [name, f"{eager[0]:.2f}" if eager else "-", f"{ort[0]:.2f}" if ort else "error",
                 f"{eager[0] / ort[0]:.2f}" if eager and ort else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table(rows: list[dict], modes: list[str]) -> str:
    by = {(r["model"], r["mode"]): r for r in rows}
    header = ["model"]
    for mode in modes:
        header += [f"eval/rn50 {mode}", f"train/rn50 {mode}"]
    header += ["ref eval/rn50", "ref train/rn50", "eager speed-up vs ref (eval, train)", "train peak MiB (eager)",
               "GMAC/img", "eager GMAC/s (eval, train)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r["model"] for r in rows if r["model"] != YARDSTICK):
        cells = [name]
        for mode in modes:
            cells += _cells(_ratios(by.get((name, mode), {})))
        ref = REFERENCE_RATIOS.get(name)
        eager = by.get((name, "eager"), {})
        ratios = _ratios(eager)
        if ref and ratios:
            speedup = (ref[0] / ratios[0], ref[1] / ratios[1])
            cells += [f"{ref[0]:.2f}", f"{ref[1]:.2f}", f"{speedup[0]:.2f}x, {speedup[1]:.2f}x",
                      f"{eager.get('train_peak_mib', float('nan')):.0f}"]
        else:
            cells += ["-", "-", "-", "-"]
        cells += _rate_cells(eager)
        lines.append("| " + " | ".join(cells) + " |")
    yard = by.get((YARDSTICK, "eager"), {})
    lines.append("| " + " | ".join([f"{YARDSTICK} (yardstick)"] + ["1.00", "1.00"] * len(modes) + ["-", "-", "-",
                 f"{yard.get('train_peak_mib', float('nan')):.0f}"] + _rate_cells(yard)) + " |")
    base_cells = [f"{by[(YARDSTICK, m)]['eval_s'] * 1000:.0f} ms / "
                  + (f"{by[(YARDSTICK, m)]['train_s'] * 1000:.0f} ms" if "train_s" in by[(YARDSTICK, m)] else "-")
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
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON, table and profiles go")
    parser.add_argument("--profiles", action=argparse.BooleanOptionalAction, default=True,
                        help="profile each eager eval forward and training step (tables in results/profiles/)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    # Every model is compiled once per mode and kept: more graphs than Dynamo's default limit of 8 per
    # code object (MetaArch.forward is shared by all models), and no reset, which would drop the yardstick's.
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for mode in args.modes:
        # warmed up (and compiled) by _best_of; onnxruntime is measured against the eager yardstick
        yardstick = _Steps(YARDSTICK, "eager" if mode == ORT_MODE else mode, args.batch, args.size)
        yard_times = dict(eval=[], train=[])
        for name in args.models:
            try:
                row = time_against_yardstick(name, yardstick, mode, args.batch, args.size, args.repeats)
                yard_times["eval"].append(row["yardstick_eval_s"])
                if "yardstick_train_s" in row:
                    yard_times["train"].append(row["yardstick_train_s"])
                if mode == "eager":
                    row.update(_work_and_memory(name, args.batch, args.size))
            except Exception as error:  # noqa: BLE001 - a failing model is reported, not fatal
                row = dict(model=name, mode=mode, error=f"{type(error).__name__}: {error}"[:300])
            print(json.dumps(row), flush=True)
            rows.append(row)
        # the yardstick's own row: its best times over the whole mode (for the absolute figures only)
        row = dict(model=YARDSTICK, mode=mode)
        if yard_times["eval"]:
            row.update(eval_s=min(yard_times["eval"]))
        if yard_times["train"]:
            row.update(train_s=min(yard_times["train"]))
        if mode == "eager":
            row.update(_work_and_memory(YARDSTICK, args.batch, args.size))
        print(json.dumps(row), flush=True)
        rows.append(row)
        del yardstick
    results = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    peak = gemm_peak_gmacs()
    profiles = {}
    if args.profiles:
        (results / "profiles").mkdir(exist_ok=True)
        for name in [YARDSTICK, *args.models]:
            profiles[name] = {}
            for phase, suffix in (("eval", "eval_forward"), ("train", "train_step")):
                prof = profile_step(name, phase, args.batch, args.size)
                (results / "profiles" / f"{name}_{suffix}.txt").write_text(prof.pop("table"))
                profiles[name][phase] = prof
    meta = dict(gemm_peak_gmacs_per_s=peak, machine=platform.processor() or platform.machine(), threads=2, batch=args.batch, size=args.size,
                repeats=args.repeats, torch=torch.__version__,
                note="ratio = model time / resnet50 time, resnet50 timed right before and after each model in one process run")
    (results / "models_cpu.json").write_text(json.dumps(dict(meta=meta, rows=rows, profiles=profiles), indent=2))
    table = _table(rows, args.modes)
    table += ("\n\nGEMM ceiling (2048^3 matrix product, 2 threads): "
              f"{peak['float32']:.0f} GMAC/s float32, {peak['bfloat16']:.0f} GMAC/s bfloat16.")
    if ORT_MODE in args.modes:
        table += ("\n\nEval forward in onnxruntime (CPU provider, ONNX from stm_backbones.export, same batch, "
                  "2 intra-op threads) against eager PyTorch, both against the eager resnet50 yardstick:\n\n"
                  + _ort_table(rows))
    if profiles:
        table += ("\n\nDense work (GEMMs, convolutions, fused attention: `DENSE_OPS`) in one profiled eager "
                  "float32 step (torch.profiler self CPU time; profiles/):\n\n" + _dense_table(profiles))
    (results / "models_cpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
