"""Cost: images/s and peak memory of inference and training steps, in fp32 and mixed precision,
for the classification models at their input size and for the dense (detection) backbones over a
resolution sweep, with fvcore FLOPs (one fused multiply-add = one FLOP, the study's convention) at
every size, so that the growth of cost with the number of tokens is visible per mixer.

Protocol (the study's development code, on a GPU): random inputs, batch 128, TF32 and
cudnn.benchmark on, warm-up iterations then timed iterations with a synchronisation after each.
``inference`` = eval mode under no_grad; ``training`` = train mode, forward and backward of the loss
(cross-entropy against random labels; the sum of the maps for dense backbones), no optimizer step.
Mixed precision (``amp``) is float16 autocast on CUDA and bfloat16 autocast on the CPU.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed iterations (weights
included); on the CPU, the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs before the timed iterations, after returning the allocator's free memory to the
OS with malloc_trim) minus the resident size just before them, i.e. what the steps add on top of the
model. Timings on a shared CPU depend on its load: compare models
measured in the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import time

import torch
import torch.nn.functional as F

from . import common

GPU_DEFAULTS = dict(batch_size=128, dense_batch_size=32, warmup=10, iters=100, sizes=(224, 384, 512, 640, 768, 1024))
CPU_DEFAULTS = dict(batch_size=4, dense_batch_size=1, warmup=1, iters=3, sizes=(224, 320, 448))
MODES = ("inference", "training")
PRECISIONS = ("fp32", "amp")


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Give the C allocator's freed memory back to the OS (glibc malloc_trim), so that memory kept from
    an earlier measurement does not hide this one's allocations from the resident size."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory (MiB) of the enclosed steps; ``.mib`` after exit."""

    def __init__(self, device: torch.device):
        self.device, self.mib, self.kind = device, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        else:
            self.ok = _reset_cpu_peak()
            self.base = _read_status_kib("VmRSS")
            self.kind = "cpu_peak_rss_increase" if self.ok and self.base is not None else None
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind:
            peak = _read_status_kib("VmHWM")
            self.mib = None if peak is None else max(peak - self.base, 0) / 1024.0
        return False


def _amp(device: torch.device, precision: str):
    if precision != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: torch.nn.Module, mode: str, precision: str, images: torch.Tensor, device: torch.device):
    dense = getattr(model, "dense", False)
    labels = None
    if mode == "training" and not dense:
        labels = torch.randint(0, max(getattr(model, "num_classes", 1), 1), (images.shape[0],),
                               generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        if mode == "inference":
            with torch.no_grad(), _amp(device, precision):
                model(images)
            return
        with _amp(device, precision):
            out = model(images)
            if dense:
                loss = sum(o.float().sum() for o in out)
            else:
                loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def time_steps(model, mode: str, precision: str, batch: int, size: int, device: torch.device, warmup: int,
               iters: int) -> dict:
    """One measurement; ``error`` instead of numbers when the step fails (out of memory, bad size)."""
    model.train(mode == "training")
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    entry = {"mode": mode, "precision": precision, "batch_size": batch, "input_size": size}
    try:
        step = make_step(model, mode, precision, images, device)
        for _ in range(warmup):
            step()
        _sync(device)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            for _ in range(iters):
                step()
                _sync(device)  # the protocol synchronises every iteration
            elapsed = time.perf_counter() - start
        entry.update(images_per_sec=batch * iters / elapsed, ms_per_step=1000.0 * elapsed / iters,
                     peak_memory_mib=mem.mib, memory_kind=mem.kind)
    except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        entry.update(images_per_sec=None, ms_per_step=None, peak_memory_mib=None,
                     error=str(exc).splitlines()[0][:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return entry


def gflops(model: torch.nn.Module, size: int, device: torch.device) -> float | None:
    """fvcore FLOPs of one image (eval mode), in G; None when fvcore cannot trace the model."""
    try:
        from stm_backbones.summary import count_flops

        flops, _ = count_flops(model.eval(), torch.zeros(1, 3, size, size, device=device))
        return flops / 1e9
    except Exception as exc:  # noqa: BLE001 - FLOPs are informative; the timings still count
        common.warn(f"FLOPs not counted at {size}px: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return None


def measure_model(model, sizes, batch: int, device, warmup: int, iters: int, modes=MODES, precisions=PRECISIONS,
                  header: str = "") -> list[dict]:
    entries = []
    for size in sizes:
        g = gflops(model, size, device)
        for mode in modes:
            for precision in precisions:
                entry = time_steps(model, mode, precision, batch, size, device, warmup, iters)
                entry["gflops_per_image"] = g
                entries.append(entry)
                ips = entry["images_per_sec"]
                mem = entry["peak_memory_mib"]
                print(f"{header} {size}px {mode:<9} {precision:<4} batch {batch}: "
                      + (f"{ips:.1f} images/s, peak {mem if mem is None else round(mem, 1)} MiB"
                         if ips is not None else f"failed ({entry['error']})")
                      + (f", {g:.3f} GFLOPs/image" if g is not None else ""), flush=True)
    return entries


def run(model_names, *, nb_classes: int, input_size: int, device: torch.device, batch_size: int,
        dense_batch_size: int, sizes, warmup: int, iters: int, dense: bool = True, modes=MODES,
        precisions=PRECISIONS) -> dict:
    """Measure every model (rank 0 only: the others wait). Returns {model: {'classification': [...],
    'dense': [...]}}."""
    results = {}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    for name in model_names:
        res = {}
        model = common.load_model(name, nb_classes, input_size, None).to(device)
        res["classification"] = measure_model(model, [input_size], batch_size, device, warmup, iters, modes,
                                              precisions, header=name)
        res["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        del model
        if dense:
            try:
                from stm_backbones import create_dense_backbone

                backbone = create_dense_backbone(name).to(device)
            except Exception as exc:  # noqa: BLE001 - e.g. a stock timm model has no dense variant
                common.warn(f"{name}: no dense backbone ({type(exc).__name__}: {exc}); resolution sweep skipped")
                backbone = None
            if backbone is not None:
                res["dense"] = measure_model(backbone, sizes, dense_batch_size, device, warmup, iters, modes,
                                             precisions, header=f"{name} (dense)")
                del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results[name] = res
    return results


def csv_rows(results: dict) -> list[dict]:
    rows = []
    for model, res in results.items():
        for variant in ("classification", "dense"):
            for e in res.get(variant, []):
                rows.append({"model": model, "variant": variant, "input_size": e["input_size"], "mode": e["mode"],
                             "precision": e["precision"], "batch_size": e["batch_size"],
                             "images_per_sec": e["images_per_sec"], "ms_per_step": e["ms_per_step"],
                             "peak_memory_mib": e["peak_memory_mib"], "gflops_per_image": e["gflops_per_image"],
                             "error": e.get("error", "")})
    return rows


def plot(results: dict, path: str) -> None:
    """Dense sweep: rows inference / training; columns images/s, peak memory, GFLOPs; one colour per
    model, solid fp32, dashed amp (log-scale y)."""
    plt = common.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (model, res) in enumerate(results.items()):
        entries = res.get("dense") or res.get("classification", [])
        colour = colours[k % len(colours)]
        for r, mode in enumerate(MODES):
            for precision, style in (("fp32", "-"), ("amp", "--")):
                sel = [e for e in entries if e["mode"] == mode and e["precision"] == precision]
                xs = [e["input_size"] for e in sel]
                for c, key in enumerate(("images_per_sec", "peak_memory_mib")):
                    ys = [e[key] if e[key] is not None else float("nan") for e in sel]
                    axes[r][c].plot(xs, ys, style, marker=".", color=colour,
                                    label=f"{model.replace('unified_', '')} {precision}")
            sel = [e for e in entries if e["mode"] == mode and e["precision"] == "fp32"]
            axes[r][2].plot([e["input_size"] for e in sel],
                            [e["gflops_per_image"] if e["gflops_per_image"] is not None else float("nan") for e in sel],
                            marker=".", color=colour, label=model.replace("unified_", ""))
    for r, mode in enumerate(MODES):
        for c, ylabel in enumerate(("images/s", "peak memory (MiB)", "GFLOPs / image")):
            ax = axes[r][c]
            ax.set_yscale("log")
            ax.set_title(f"{mode}: {ylabel}", fontsize=9)
            ax.set_xlabel("input size (px)")
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    common.save_figure(fig, path)
