"""GPU acceptance check: everything that only runs on a CUDA device, in one unattended command.

    nox -s gpu_check                      # or: python benchmarks/gpu_check.py
    nox -s gpu_check -- --dry-run         # list every step and command, run nothing (works anywhere)

Steps (each fails loudly; nothing is skipped silently):
  device        the CUDA device (name, compute capability, memory); no device -> exit 2
  build         stm_cuda_ops built for this GPU's architecture (FORCE_CUDA=1)
  verify_build  the build has CUDA kernels for this architecture and the CUDA dispatch keys
  cuda_tests    the op's CUDA tests (`-m cuda`): parity with the reference (fp64/fp32/fp16/bf16) and with
                the CPU kernel, gradcheck, opcheck, autocast, torch.compile, the emulated kernels against the
                real ones, a beyond-2^31-element indexing case (if memory allows: reported either way);
                any failure, error or unexplained skip fails the check
  op_benchmark  the CUDA op against the reference on the GPU and against the CPU kernel (U-InternImage-tiny
                stages at 224 px, batch 8), with an output parity check
  models        every tiny model, the study's throughput protocol (batch 128, 224 px, TF32, warm-up,
                synchronised timing): eval forward and one fp16 AMP training step with GradScaler
                (images/s, peak memory); DCNv3 must use the compiled CUDA op
  classification  two epochs on the digits with fp16 AMP + GradScaler (the README command); accuracy floor
  detection     20 Mask R-CNN iterations on the shapes set on the GPU, then its evaluation
  report        benchmarks/results/gpu/gpu_check_<device>.{json,md}

The whole check must finish within BUDGET_S on one modern GPU (exceeding it is reported as a failure).
Internal steps re-invoke this script (`--step NAME --record FILE`) so that they import the freshly built op.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "gpu"
WORK = Path("output") / "gpu_check"  # relative to ROOT: scratch (logs, app outputs), git-ignored
BUDGET_S = 600
ARCH_PLACEHOLDER = "X.Y"  # in the dry run: this GPU's compute capability, e.g. 9.0

TINY_MODELS = ["unified_convnext_tiny", "unified_halo_tiny", "unified_pvt_tiny", "unified_swin_tiny",
               "unified_dcn_v3_tiny", "unified_pvt_v2_tiny", "official_swin_tiny"]
CLS_MIN_ACC1 = 50.0  # digits after 2 epochs: ~90% when training works, 10% is chance

# The user-facing commands, exactly as packages/cuda_ops/README.md documents them (a test checks that).
BUILD_COMMAND = ["python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "packages/cuda_ops"]
CUDA_TESTS_COMMAND = ["python", "-m", "pytest", "-q", "-m", "cuda", "packages/cuda_ops/tests",
                      f"--junitxml={WORK}/cuda_tests.xml"]
CLS_COMMAND = ["python", "apps/classification/main.py", "--model", "unified_convnext_micro", "--input_size", "32",
               "--epochs", "2", "--batch_size", "64", "--device", "cuda", "--use_amp", "true", "--amp_dtype",
               "float16", "--output_dir", f"{WORK}/cls_digits"]
DET_COMMAND = ["python", "apps/detection/train_net.py", "--config-file",
               "apps/detection/configs/demo_shapes_unified_convnext_micro.yaml", "SOLVER.MAX_ITER", "20",
               "SOLVER.STEPS", "(15,)", "SOLVER.WARMUP_ITERS", "5", "SOLVER.CHECKPOINT_PERIOD", "20",
               "TEST.EVAL_PERIOD", "0", "MODEL.DEVICE", "cuda", "OUTPUT_DIR", f"{WORK}/det_shapes"]


class CheckFailed(Exception):
    """A mismatch or a broken step: reported, and the check exits non-zero. `result` keeps what the
    step measured before it failed (it still goes into the report)."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


def _self(step: str, *extra: str) -> list[str]:
    return ["python", "benchmarks/gpu_check.py", "--step", step, *extra]


def plan(arch: str) -> list[dict]:
    """Every step: name, what it checks, the command it runs (None: done in this process) and its env."""
    return [
        dict(name="device", what="find the CUDA device (name, capability, memory); none -> exit 2", cmd=None),
        dict(name="build", what="build stm_cuda_ops for this GPU only (X.Y = its compute capability, e.g. 9.0)", cmd=BUILD_COMMAND,
             env={"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)},
             required=True, timeout=420),
        dict(name="verify_build", what="CUDA kernels for this architecture, CUDA dispatch keys registered",
             cmd=_self("verify_build", "--arch", arch), required=True, timeout=120),
        dict(name="cuda_tests", what="the op's CUDA tests (parity fp64/fp32/fp16/bf16, CPU parity, gradcheck, "
             "opcheck, autocast, compile, emulation vs GPU, >2^31-element indexing); no failure, no unexplained skip",
             cmd=CUDA_TESTS_COMMAND, env={"STM_REQUIRE_GPU": "1"}, timeout=300),
        dict(name="op_benchmark", what="CUDA op vs reference (GPU) vs CPU kernel, U-InternImage-tiny stages, "
             "batch 8; outputs must agree", cmd=_self("op_benchmark"), timeout=180),
        dict(name="models", what="every tiny model: eval forward + fp16 AMP train step with GradScaler, batch 128, "
             "224 px, TF32, warm-up, synchronised timing; images/s and peak memory", cmd=_self("models"), timeout=300),
        dict(name="classification", what=f"2 epochs on the digits, fp16 AMP + GradScaler; top-1 >= {CLS_MIN_ACC1}%",
             cmd=CLS_COMMAND, timeout=300),
        dict(name="detection", what="20 Mask R-CNN iterations on the shapes set, then its COCO evaluation",
             cmd=DET_COMMAND, timeout=300),
        dict(name="report", what="write benchmarks/results/gpu/gpu_check_<device>.{json,md}", cmd=None),
    ]


def print_plan(steps: list[dict]) -> None:
    print(f"gpu_check: {len(steps)} steps (dry run: nothing is executed)")
    for i, s in enumerate(steps, 1):
        print(f"{i:2d}. {s['name']}: {s['what']}")
        if s.get("cmd"):
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.get("env", {}).items() if k != "MAX_JOBS")
            print(f"    $ {(env + ' ') if env else ''}{shlex.join(s['cmd'])}")


# ------------------------------------------------------------------------------------------------ helpers


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, iters: int) -> float:
    """Median seconds per call after `warmup` calls, each call synchronised."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ internal steps


def step_device(args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CheckFailed(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}). gpu_check needs a GPU; `--dry-run` lists its steps without one")
    if args.device != "cuda":
        return {"name": "cpu (smoke run)", "arch": ARCH_PLACEHOLDER}
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "arch": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def step_verify_build(args) -> dict:
    import torch

    import stm_cuda_ops

    info = stm_cuda_ops.build_info()
    want = args.arch.replace(".", "")
    if not info.get("cuda_kernels"):
        raise CheckFailed(f"the build has no CUDA kernels: {info}")
    if want not in str(info.get("cuda_archs", "")).split(","):
        raise CheckFailed(f"the build has no kernels for sm_{want}: cuda_archs={info.get('cuda_archs')}")
    for name in ("ms_deform_attn_forward", "ms_deform_attn_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"stm_cuda_ops::{name}", "CUDA"):
            raise CheckFailed(f"stm_cuda_ops::{name} has no CUDA kernel registered")
    return {k: v for k, v in info.items() if k != "torch"}


def step_op_benchmark(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_ms_deform_attn import STAGES, make_inputs

    import stm_cuda_ops

    device = args.device
    rows = []
    for name, channels, heads, side in [st for st in STAGES if st[0] in args.stages]:
        cpu_inputs = make_inputs(channels, heads, side)
        inputs = [t.to(device) for t in cpu_inputs]
        grad = torch.randn(inputs[0].shape[0], inputs[3].shape[1], channels, generator=torch.Generator().manual_seed(1))
        row = {"stage": name, "heads": heads, "padded_map": side + 2, "queries": side * side}
        impls = [("op", stm_cuda_ops.ms_deform_attn, inputs, device, grad.to(device)),
                 ("reference", stm_cuda_ops.ms_deform_attn_reference, inputs, device, grad.to(device)),
                 ("cpu_kernel", stm_cuda_ops.ms_deform_attn, cpu_inputs, "cpu", grad)]
        outs = {}
        for key, fn, (v, s, i, lo, a), dev, g in impls:
            with torch.no_grad():
                outs[key] = fn(v, s, i, lo, a, 128).float().cpu()
            row[f"{key}_fwd_ms"] = 1e3 * _timed(lambda fn=fn, v=v, s=s, i=i, lo=lo, a=a: fn(v, s, i, lo, a, 128),
                                                dev, warmup=args.warmup, iters=args.iters)
            leaves = [t.detach().clone().requires_grad_(True) for t in (v, lo, a)]

            def fwd_bwd(fn=fn, s=s, i=i, leaves=leaves, g=g):
                out = fn(leaves[0], s, i, leaves[1], leaves[2], 128)
                torch.autograd.grad(out, leaves, g)

            row[f"{key}_fwd_bwd_ms"] = 1e3 * _timed(fwd_bwd, dev, warmup=args.warmup, iters=args.iters)
        for other in ("reference", "cpu_kernel"):
            diff = (outs["op"] - outs[other]).abs().max().item()
            row[f"max_abs_diff_vs_{other}"] = diff
            scale = max(1.0, outs[other].abs().max().item())
            if not diff <= 1e-4 * scale:
                raise CheckFailed(f"op_benchmark {name}: CUDA op and {other} differ by {diff:.3g} (scale {scale:.3g})")
            row[f"speedup_fwd_vs_{other}"] = row[f"{other}_fwd_ms"] / row["op_fwd_ms"]
            row[f"speedup_fwd_bwd_vs_{other}"] = row[f"{other}_fwd_bwd_ms"] / row["op_fwd_bwd_ms"]
        rows.append(row)
    return {"rows": rows}


def _bench_model(name: str, args, device, amp_dtype) -> dict:
    """One model: timed fp16 AMP training steps (GradScaler) and eval forwards, peak memory of each."""
    import timm
    import torch

    from stm_backbones import ops as backbone_ops

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).to(device)
    if "dcn_v3" in name and not backbone_ops.compiled_op_available():
        raise CheckFailed(f"{name}: the DCNv3 blocks would use the pure-PyTorch fallback, not the compiled op")
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    losses = []

    def train_step():
        with torch.autocast(device.type, dtype=amp_dtype):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    def eval_forward():
        with torch.no_grad():
            return model(images)

    def peak_mib():
        return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    train_s = _timed(train_step, device, warmup=args.warmup, iters=args.iters)
    train_mem = peak_mib()
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eval_s = _timed(eval_forward, device, warmup=args.warmup, iters=args.iters)
    eval_mem = peak_mib()
    out = eval_forward()
    loss_values = [float(x) for x in losses]
    if not all(math.isfinite(x) for x in loss_values) or not bool(torch.isfinite(out).all()):
        raise CheckFailed(f"{name}: non-finite loss or output ({loss_values[:3]} ...)")
    scale = scaler.get_scale() if scaler.is_enabled() else None
    if scale is not None and not math.isfinite(scale):
        raise CheckFailed(f"{name}: GradScaler scale is not finite")
    return {"model": name, "batch": args.batch_size, "img_size": args.img_size,
            "train_images_per_s": args.batch_size / train_s, "train_peak_mib": train_mem,
            "eval_images_per_s": args.batch_size / eval_s, "eval_peak_mib": eval_mem,
            "loss_first": loss_values[0], "loss_last": loss_values[-1], "loss_scale": scale}


def step_models(args) -> dict:
    import torch

    import stm_backbones  # noqa: F401  (registers the models with timm)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    rows, errors = [], []
    for name in args.models:  # one broken model does not hide the others' results
        try:
            rows.append(_bench_model(name, args, device, amp_dtype))
        except Exception as exc:  # noqa: BLE001 - reported below, and the step fails
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"rows": rows, "amp_dtype": str(amp_dtype), "tf32": device.type == "cuda"}
    if errors:
        raise CheckFailed("; ".join(errors), result)
    return result


INTERNAL = {"device": step_device, "verify_build": step_verify_build, "op_benchmark": step_op_benchmark,
            "models": step_models}


# ------------------------------------------------------------------------------------------------ checks of
# the external steps' outputs


def check_cuda_tests(xml_path: Path) -> dict:
    if not xml_path.is_file():
        raise CheckFailed(f"pytest wrote no report ({xml_path})")
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped = []
    for case in suite.iter("testcase"):
        skip = case.find("skipped")
        if skip is not None:
            skipped.append({"test": f"{case.get('classname')}::{case.get('name')}", "reason": skip.get("message", "")})
    result = {**counts, "skipped_tests": skipped}
    if counts["tests"] == 0:
        raise CheckFailed("no CUDA test ran (the -m cuda selection is empty)")
    if counts["failures"] or counts["errors"]:
        raise CheckFailed(f"CUDA tests: {counts['failures']} failed, {counts['errors']} errors (see {xml_path})")
    unexplained = [s for s in skipped if not s["reason"].startswith("memory:")]
    if unexplained:
        raise CheckFailed(f"CUDA tests skipped: {unexplained}")
    return result


def check_classification(out_dir: Path) -> dict:
    log = out_dir / "log.txt"
    if not log.is_file():
        raise CheckFailed(f"classification wrote no {log}")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if len(rows) != 2:
        raise CheckFailed(f"classification: expected 2 epochs in {log}, found {len(rows)}")
    last = rows[-1]
    scale_keys = [k for k in last if "loss_scale" in k]
    if not scale_keys:
        raise CheckFailed(f"classification: no loss_scale in the log: the GradScaler was not used ({sorted(last)})")
    acc = float(last.get("test_acc1", float("nan")))
    if not acc >= CLS_MIN_ACC1:
        raise CheckFailed(f"classification: top-1 {acc} after 2 epochs, below the {CLS_MIN_ACC1}% floor")
    return {"test_acc1": acc, "train_loss": last.get("train_loss"), "loss_scale": last[scale_keys[0]],
            "images_per_sec": last.get("train_images_per_sec")}


def check_detection(out_dir: Path) -> dict:
    metrics = out_dir / "metrics.json"
    if not metrics.is_file():
        raise CheckFailed(f"detection wrote no {metrics}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "total_loss" in r]
    if not train or train[-1].get("iteration") != 19:
        raise CheckFailed(f"detection: training did not reach iteration 19 ({metrics})")
    if not all(math.isfinite(r["total_loss"]) for r in train):
        raise CheckFailed("detection: non-finite total_loss")
    ap = {k: v for r in rows for k, v in r.items() if k.startswith(("bbox/AP", "segm/AP"))}
    return {"iterations": 20, "total_loss_last": train[-1]["total_loss"], **ap}


# ------------------------------------------------------------------------------------------------ driver


def run_command(step: dict, log_dir: Path) -> None:
    cmd = [sys.executable if c == "python" else c for c in step["cmd"]]
    env = {**os.environ, **step.get("env", {})}
    log = log_dir / f"{step['name']}.log"
    print(f"[gpu_check] {step['name']}: $ {shlex.join(step['cmd'])}  (log: {log})", flush=True)
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=step.get("timeout", 300))
        except subprocess.TimeoutExpired as exc:
            raise CheckFailed(f"{step['name']} timed out after {exc.timeout} s (log: {log})") from None
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise CheckFailed(f"{step['name']} exited with {proc.returncode} (log: {log}); last lines:\n{tail}")


def run_all(args) -> int:
    started = time.perf_counter()
    try:
        device = step_device(args)
    except CheckFailed as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    steps = plan(device["arch"])
    log_dir = ROOT / WORK
    # A clean scratch folder: the apps would otherwise resume from (or append to) an earlier run's
    # checkpoints and logs, and a stale log could pass a check.
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": device, "steps": []}
    failed = []
    for step in steps:
        if step["name"] in ("device", "report"):
            continue
        t0 = time.perf_counter()
        record = {"name": step["name"], "what": step["what"],
                  "command": shlex.join(step["cmd"]) if step.get("cmd") else None}
        try:
            if step["name"] in INTERNAL or step["cmd"][:3] == ["python", "benchmarks/gpu_check.py", "--step"]:
                out = log_dir / f"{step['name']}.json"
                out.unlink(missing_ok=True)
                step = {**step, "cmd": [*step["cmd"], "--record", str(out)]}
                try:
                    run_command(step, log_dir)
                finally:  # a failed step's partial results go into the report too
                    if out.is_file():
                        record["result"] = json.loads(out.read_text())
            else:
                run_command(step, log_dir)
                if step["name"] == "cuda_tests":
                    record["result"] = check_cuda_tests(ROOT / WORK / "cuda_tests.xml")
                elif step["name"] == "classification":
                    record["result"] = check_classification(ROOT / WORK / "cls_digits")
                elif step["name"] == "detection":
                    record["result"] = check_detection(ROOT / WORK / "det_shapes")
            record["status"] = "ok"
        except (CheckFailed, OSError, ValueError) as exc:
            record["status"] = "FAILED"
            record["error"] = str(exc)
            failed.append(step["name"])
            print(f"[gpu_check] FAILED {step['name']}: {exc}", file=sys.stderr, flush=True)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        results["steps"].append(record)
        print(f"[gpu_check] {step['name']}: {record['status']} in {record['seconds']} s", flush=True)
        if record["status"] != "ok" and step.get("required"):
            print(f"[gpu_check] stopping: {step['name']} is required by the later steps", file=sys.stderr)
            for rest in steps[steps.index(next(s for s in steps if s["name"] == step["name"])) + 1:]:
                if rest["name"] != "report":
                    results["steps"].append({"name": rest["name"], "status": "NOT RUN", "what": rest["what"]})
            break
    total = time.perf_counter() - started
    results["total_seconds"] = round(total, 1)
    if total > BUDGET_S:
        failed.append("budget")
        results["budget_error"] = f"took {total:.0f} s, over the {BUDGET_S} s budget"
    results["failed"] = failed
    results["passed"] = not failed
    paths = write_report(results)
    shown = [str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in paths]
    print(f"[gpu_check] {'PASSED' if not failed else 'FAILED: ' + ', '.join(failed)} in {total:.0f} s; "
          f"report: {', '.join(shown)}", flush=True)
    return 0 if not failed else 1


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def to_markdown(results: dict) -> str:
    dev = results["device"]
    lines = [f"# gpu_check on {dev.get('name')}", "",
             f"Compute capability {dev.get('capability')}, {dev.get('memory_gib')} GiB, torch {dev.get('torch')}, "
             f"CUDA {dev.get('cuda_runtime')}. Total {results['total_seconds']} s (budget {BUDGET_S} s). "
             f"Result: **{'PASSED' if results['passed'] else 'FAILED (' + ', '.join(results['failed']) + ')'}**.", "",
             "| step | status | seconds | notes |", "|---|---|---:|---|"]
    for s in results["steps"]:
        note = s.get("error", "").splitlines()[0] if s.get("error") else ""
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {note} |")
    by_name = {s["name"]: s for s in results["steps"]}
    ops = by_name.get("op_benchmark", {}).get("result")
    if ops:
        lines += ["", "## Deformable op (U-InternImage-tiny stages, 224 px, batch 8, float32; median ms)", "",
                  "| stage | op fwd | op fwd+bwd | reference fwd | reference fwd+bwd | CPU kernel fwd | CPU kernel "
                  "fwd+bwd | x vs reference (fwd+bwd) | x vs CPU kernel (fwd+bwd) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in ops["rows"]:
            lines.append(f"| {r['stage']} | {r['op_fwd_ms']:.3f} | {r['op_fwd_bwd_ms']:.3f} | {r['reference_fwd_ms']:.3f} "
                         f"| {r['reference_fwd_bwd_ms']:.3f} | {r['cpu_kernel_fwd_ms']:.2f} | "
                         f"{r['cpu_kernel_fwd_bwd_ms']:.2f} | {r['speedup_fwd_bwd_vs_reference']:.1f} | "
                         f"{r['speedup_fwd_bwd_vs_cpu_kernel']:.1f} |")
    models = by_name.get("models", {}).get("result")
    if models:
        lines += ["", "## Tiny models (batch 128, 224 px, TF32; train step = fp16 AMP + GradScaler)", "",
                  "| model | eval images/s | eval peak MiB | train images/s | train peak MiB |",
                  "|---|---:|---:|---:|---:|"]
        for r in models["rows"]:
            lines.append(f"| {r['model']} | {r['eval_images_per_s']:.0f} | {r['eval_peak_mib']:.0f} | "
                         f"{r['train_images_per_s']:.0f} | {r['train_peak_mib']:.0f} |")
    for name in ("cuda_tests", "classification", "detection"):
        res = by_name.get(name, {}).get("result")
        if res:
            lines += ["", f"**{name}**: " + ", ".join(f"{k} = {v}" for k, v in res.items() if k != "skipped_tests")]
            for s in res.get("skipped_tests", []):
                lines.append(f"- skipped (reported): {s['test']}: {s['reason']}")
    return "\n".join(lines) + "\n"


def write_report(results: dict) -> list[Path]:
    stem = RESULTS / f"gpu_check_{_slug(results['device'].get('name', 'gpu'))}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    _write_atomic(json_path, json.dumps(results, indent=2, default=str) + "\n")
    _write_atomic(md_path, to_markdown(results))
    return [json_path, md_path]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="list every step and command, run nothing")
    p.add_argument("--step", choices=sorted(INTERNAL), help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    p.add_argument("--arch", default="", help=argparse.SUPPRESS)
    # Smoke-test knobs for the internal steps (the tests run them on the CPU at toy sizes).
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--models", nargs="+", default=TINY_MODELS, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--img-size", type=int, default=224, help=argparse.SUPPRESS)
    p.add_argument("--stages", nargs="+", default=["stage1", "stage2", "stage3", "stage4"], help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        print_plan(plan(ARCH_PLACEHOLDER))
        return 0
    if args.step:
        rc = 0
        try:
            result = INTERNAL[args.step](args)
        except CheckFailed as exc:
            print(f"ERROR: {exc}", file=sys.stderr)
            result, rc = {**(exc.result or {}), "error": str(exc)}, 1
        text = json.dumps(result, indent=2, default=str)
        if args.record:
            _write_atomic(Path(args.record), text + "\n")
        print(text)
        return rc
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
