"""CPU benchmark of the compiled multi-scale deformable attention op vs the pure-PyTorch reference.

Shapes: every stage of U-InternImage-tiny (DCNv3 blocks) at 224 px, batch 8: channels 64/128/256/512,
heads 4/8/16/32 (D = 16), P = 9 points, one level, stage maps 56/28/14/7 zero-padded by one pixel to
58/30/16/9, one query per unpadded pixel. Sampling locations are what the block produces: the
padded-frame pixel centre of each query plus the 3x3 kernel grid plus small learned offsets;
attention weights are a softmax over the 9 points.

Reports best-of-N times (after warm-up) of the forward and of forward+backward, for both
implementations in the same run, their ratio, and the forward's achieved memory traffic (the bytes
it must move at least: read value, locations and weights, write the output) against this machine's
measured copy bandwidth. Writes benchmarks/results/ms_deform_attn_cpu.{json,md}.

Run from the repository root: python benchmarks/bench_ms_deform_attn.py [--threads 2] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import stm_cuda_ops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# (name, channels, heads, stage map side) of U-InternImage-tiny at 224 px.
STAGES = [("stage1", 64, 4, 56), ("stage2", 128, 8, 28), ("stage3", 256, 16, 14), ("stage4", 512, 32, 7)]
BATCH, D, P, PAD = 8, 16, 9, 1


def make_inputs(channels: int, heads: int, side: int, *, seed: int = 0):
    """Inputs shaped and distributed like a DCNv3 block's call (float32)."""
    g = torch.Generator().manual_seed(seed)
    hp = wp = side + 2 * PAD
    assert channels == heads * D
    value = torch.randn(BATCH, hp, wp, heads, D, generator=g)
    value[:, :PAD] = 0  # the block zero-pads the projected value map
    value[:, -PAD:] = 0
    value[:, :, :PAD] = 0
    value[:, :, -PAD:] = 0
    value = value.reshape(BATCH, hp * wp, heads, D)
    spatial_shapes = torch.tensor([[hp, wp]], dtype=torch.long)
    level_start_index = torch.zeros(1, dtype=torch.long)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ref = torch.stack([(xs.flatten() + PAD + 0.5) / wp, (ys.flatten() + PAD + 0.5) / hp], -1)  # (Lq, 2)
    # Kernel grid: point p has base offset (dx, dy) = (p // 3 - 1, p % 3 - 1) pixels.
    p = torch.arange(P)
    grid = torch.stack([p // 3 - 1, p % 3 - 1], -1).float()  # (P, 2)
    offsets = 0.5 * torch.randn(BATCH, side * side, heads, 1, P, 2, generator=g)  # learned, ~pixels
    scale = torch.tensor([wp, hp], dtype=torch.float32)
    loc = ref[None, :, None, None, None, :] + (grid + offsets) / scale
    attn = torch.randn(BATCH, side * side, heads, 1, P, generator=g).softmax(-1)
    return value, spatial_shapes, level_start_index, loc.contiguous(), attn.contiguous()


def best_time(fn, repeat: int, warmup: int = 2) -> tuple[float, float]:
    """Best wall-clock time and best process CPU time (all threads) of `repeat` runs, in seconds.

    The CPU time is insensitive to other processes competing for the cores (it only counts time this
    process ran), so on a shared machine its ratios are the more stable comparison."""
    for _ in range(warmup):
        fn()
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def copy_bandwidth(repeat: int) -> float:
    """Bytes per second moved (read + write) by a large tensor copy with the current threads."""
    n = 64 * 1024 * 1024  # 256 MiB of float32, far beyond the caches
    src = torch.ones(n)
    dst = torch.empty(n)
    t, _ = best_time(lambda: dst.copy_(src), repeat, warmup=2)
    return 2 * src.numel() * src.element_size() / t


def _loadavg() -> str:
    """1-minute load average (how busy the machine was: the timings are only as good as that)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def forward_min_bytes(value, loc, attn, out) -> int:
    return sum(t.numel() * t.element_size() for t in (value, loc, attn, out))


def bench_stage(name, channels, heads, side, repeat):
    value, shapes, starts, loc, attn = make_inputs(channels, heads, side)
    impls = {
        "compiled": stm_cuda_ops.ms_deform_attn,
        "reference": stm_cuda_ops.ms_deform_attn_reference,
    }
    row = {"stage": name, "channels": channels, "heads": heads, "D": D, "P": P, "batch": BATCH,
           "padded_map": [side + 2 * PAD, side + 2 * PAD], "queries": side * side}
    grad = torch.randn(BATCH, side * side, heads * D)
    outs = {}
    for key, fn in impls.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(value, shapes, starts, loc, attn, 128)

        v, lo, a = (t.detach().clone().requires_grad_(True) for t in (value, loc, attn))

        def fwd_bwd(fn=fn, v=v, lo=lo, a=a):
            out = fn(v, shapes, starts, lo, a, 128)
            torch.autograd.grad(out, (v, lo, a), grad)

        for what, fn_ in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            wall, cpu = best_time(fn_, repeat)
            row[f"{key}_{what}_ms"] = 1e3 * wall
            row[f"{key}_{what}_cpu_ms"] = 1e3 * cpu
        outs[key] = fwd()
    row["max_abs_diff"] = (outs["compiled"] - outs["reference"]).abs().max().item()
    for what in ("fwd", "fwd_bwd"):
        row[f"speedup_{what}"] = row[f"reference_{what}_ms"] / row[f"compiled_{what}_ms"]
        row[f"speedup_{what}_cpu"] = row[f"reference_{what}_cpu_ms"] / row[f"compiled_{what}_cpu_ms"]
    nbytes = forward_min_bytes(value, loc, attn, outs["compiled"])
    row["fwd_min_bytes"] = nbytes
    row["compiled_fwd_GBps"] = nbytes / (row["compiled_fwd_ms"] * 1e-3) / 1e9
    return row


def to_markdown(result) -> str:
    lines = [
        "# ms_deform_attn on CPU: compiled op vs pure-PyTorch reference",
        "",
        f"U-InternImage-tiny stages at 224 px, batch {BATCH}, D={D}, P={P}, L=1, float32, "
        f"{result['threads']} threads, best of {result['repeat']} after warm-up. "
        f"CPU kernel set: {result['build_info'].get('cpu_isa')}. Machine: {result['cpu']} "
        f"({os.cpu_count()} logical CPUs; load average {result['loadavg_before']} before, "
        f"{result['loadavg_after']} after the run).",
        "",
        "Wall-clock times (x = reference / op); the last two columns compare process CPU time "
        "instead (all threads; stable when other processes compete for the cores).",
        "",
        "| stage | heads | padded map | queries | fwd ref (ms) | fwd op (ms) | fwd x | "
        "fwd+bwd ref (ms) | fwd+bwd op (ms) | fwd+bwd x | op fwd GB/s | % of copy BW | fwd x (CPU) | "
        "fwd+bwd x (CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bw = result["copy_bandwidth_GBps"]
    for r in result["stages"]:
        hp, wp = r["padded_map"]
        lines.append(
            f"| {r['stage']} | {r['heads']} | {hp}x{wp} | {r['queries']} | "
            f"{r['reference_fwd_ms']:.2f} | {r['compiled_fwd_ms']:.2f} | {r['speedup_fwd']:.1f} | "
            f"{r['reference_fwd_bwd_ms']:.2f} | {r['compiled_fwd_bwd_ms']:.2f} | "
            f"{r['speedup_fwd_bwd']:.1f} | {r['compiled_fwd_GBps']:.1f} | "
            f"{100 * r['compiled_fwd_GBps'] / bw:.0f}% | {r['speedup_fwd_cpu']:.1f} | "
            f"{r['speedup_fwd_bwd_cpu']:.1f} |"
        )
    lines += [
        "",
        f"Copy bandwidth (read + write of a 256 MiB float32 tensor copy, same threads): "
        f"{bw:.1f} GB/s. Forward GB/s counts the minimum traffic: value, sampling locations and "
        "attention weights read once, output written once.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    info = stm_cuda_ops.build_info()
    if not info["extension_loaded"]:
        raise SystemExit(f"stm_cuda_ops extension not built: {info.get('error')}")
    result = {
        "benchmark": "ms_deform_attn_cpu",
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "repeat": args.repeat,
        "build_info": info,
        "loadavg_before": _loadavg(),
        "copy_bandwidth_GBps": copy_bandwidth(args.repeat) / 1e9,
        "stages": [],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    result["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for stage in STAGES:
        row = bench_stage(*stage, repeat=args.repeat)
        result["stages"].append(row)
        print(
            f"{row['stage']}: fwd {row['reference_fwd_ms']:.2f} -> {row['compiled_fwd_ms']:.2f} ms "
            f"(x{row['speedup_fwd']:.1f}), fwd+bwd {row['reference_fwd_bwd_ms']:.2f} -> "
            f"{row['compiled_fwd_bwd_ms']:.2f} ms (x{row['speedup_fwd_bwd']:.1f}), "
            f"{row['compiled_fwd_GBps']:.1f} GB/s, max|diff| {row['max_abs_diff']:.2e}; CPU-time ratios "
            f"x{row['speedup_fwd_cpu']:.1f} / x{row['speedup_fwd_bwd_cpu']:.1f}",
            flush=True,
        )
    result["loadavg_after"] = _loadavg()
    print(f"copy bandwidth: {result['copy_bandwidth_GBps']:.1f} GB/s")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "ms_deform_attn_cpu.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out / "ms_deform_attn_cpu.json")
    (args.out / "ms_deform_attn_cpu.md").write_text(to_markdown(result))
    print(f"wrote {args.out / 'ms_deform_attn_cpu.json'} and {args.out / 'ms_deform_attn_cpu.md'}")


if __name__ == "__main__":
    main()
