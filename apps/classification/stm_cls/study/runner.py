"""The study's steps, their state file and the launchers that run them.

A study is a list of steps, each a command of the app's own tools: ``train:<model>`` (``main.py``, the
classification recipe), ``eval:<model>`` (``main.py --eval`` of the final weights and of their EMA),
``analysis:<name>`` (``analyze.py`` over every model at once, so each figure sets the mixers side by
side), then the report. ``OUT/state.json`` records each step's status, command, attempts and result, and
is rewritten atomically after every change. A rerun of the same study skips the steps marked done and
reruns the others; an unfinished training resumes from its newest checkpoint (``main.py``'s
auto-resume), so a killed study loses at most the epoch in progress.

Launchers: ``local`` (one process after another, the default; the child is killed with the study),
``torchrun`` (``--nproc_per_node`` processes per training), and submitit's executors for trainings
(``slurm``: one SLURM job per model, waited for and collected; ``submitit_local``: the same path on this
machine, used by the tests). Evaluations and analyses run locally.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2]
MAIN_PY = APP_DIR / "main.py"
ANALYZE_PY = APP_DIR / "analyze.py"
ANALYSES = ("invariance", "erf", "robustness", "cost")
LAUNCHERS = ("local", "torchrun", "slurm", "submitit_local")
ACC_RE = re.compile(r"^\* Acc@1 ([0-9.]+) Acc@5 ([0-9.]+) loss ([0-9.naninf]+) \((\d+) images", re.M)


def default_models() -> list[str]:
    """The smallest model of each of the study's mixers, from the registry (the five micro models)."""
    import stm_backbones

    return [family.smallest for family in stm_backbones.list_families(study=True)]


class StudyError(ValueError):
    """A study that cannot run as configured (reported as ERROR, exit 2)."""


class StepFailed(RuntimeError):
    """A step's command failed; the study stops, the state keeps what finished."""


@dataclass
class StudyConfig:
    models: list[str]
    output_dir: Path
    data_path: str | None = None
    epochs: int | None = None
    analyses: list[str] = field(default_factory=lambda: list(ANALYSES))
    checkpoints: dict[str, str] = field(default_factory=dict)
    launcher: str = "local"
    nproc_per_node: int = 1
    gpus_per_job: int = 1
    slurm_partition: str | None = None
    timeout_min: int = 60 * 24
    seed: int = 0
    num_images: int | None = None
    analysis_args: list[str] = field(default_factory=list)
    train_args: list[str] = field(default_factory=list)
    python: str = sys.executable
    input_sizes: dict[str, int] = field(default_factory=dict)  # filled by run_study (model_input_size)

    def model_dir(self, model: str) -> Path:
        return self.output_dir / "train" / model


# ------------------------------------------------------------------------------------------------ state
class State:
    """``OUT/state.json``: {"steps": {name: {"status", "command", "attempts", "result", ...}}, ...}."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"steps": {}}
        if path.exists():
            try:
                self.data = json.loads(path.read_text())
            except ValueError:
                print(f"WARNING: {path} is not valid JSON; starting a fresh state (finished trainings are "
                      f"still found by their checkpoints)", file=sys.stderr)

    def step(self, name: str) -> dict:
        return self.data["steps"].setdefault(name, {"status": "pending", "attempts": 0})

    def done(self, name: str, fingerprint: str | None = None) -> bool:
        step = self.data["steps"].get(name, {})
        return step.get("status") == "done" and (fingerprint is None or step.get("fingerprint") == fingerprint)

    def update(self, name: str, **values) -> None:
        self.step(name).update(values)
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    from ..checkpoint import atomic_write_text  # the app's one atomic writer (temp file, fsync, rename)

    atomic_write_text(text, str(path))


# ------------------------------------------------------------------------------------------------ launch
def _die_with_parent() -> None:
    """Children get SIGKILL when the study process dies (Linux), so a killed study leaves no orphan
    training writing into the folder that the rerun resumes from."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_logged(cmd: list[str], log: Path) -> int:
    """Run ``cmd`` with stdout+stderr appended to ``log``; returns the exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=str(APP_DIR.parents[1]),
                                preexec_fn=_die_with_parent)
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def _submitit_executor(cfg: StudyConfig):
    try:
        import submitit
    except ImportError:
        raise StudyError("--launcher slurm/submitit_local needs the submitit package (pip install submitit)") from None
    folder = cfg.output_dir / "jobs" / "%j"
    if cfg.launcher == "slurm":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = dict(timeout_min=cfg.timeout_min, gpus_per_node=cfg.gpus_per_job, tasks_per_node=cfg.gpus_per_job,
                      nodes=1, cpus_per_task=10, name="stm_study")
        if cfg.slurm_partition:
            params["slurm_partition"] = cfg.slurm_partition
        executor.update_parameters(**params)
    else:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=cfg.timeout_min)
    return executor


def run_jobs(cfg: StudyConfig, jobs: list[tuple[list[str], Path]]) -> list[int]:
    """Run training commands with the configured launcher; returns their exit codes (in order).

    local/torchrun run them one after another; submitit submits them all at once (one job each) and
    waits for every job, so the jobs of a SLURM cluster train in parallel.
    """
    if cfg.launcher in ("local", "torchrun"):
        return [run_logged(cmd, log) for cmd, log in jobs]
    import submitit

    executor = _submitit_executor(cfg)
    submitted = []
    for cmd, log in jobs:
        shell = ["sh", "-c", 'exec "$@" >> "$STM_STUDY_LOG" 2>&1', "sh", *cmd]
        env = dict(child_env(), STM_STUDY_LOG=str(log))
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} submitit ({cfg.launcher}) $ {shlex.join(cmd)}\n")
        job = executor.submit(submitit.helpers.CommandFunction(shell, cwd=str(APP_DIR.parents[1]), env=env,
                                                               verbose=False))
        print(f"submitted job {job.job_id} ({cfg.launcher}): log {log}")
        submitted.append(job)
    codes = []
    for job in submitted:
        try:
            job.result()
            codes.append(0)
        except Exception as exc:  # noqa: BLE001 - submitit raises for failed jobs; the log has the details
            print(f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
                  file=sys.stderr)
            codes.append(1)
    return codes


# ------------------------------------------------------------------------------------------------ steps
def _flag_value(args: list[str], flag: str, default=None):
    """The value of ``flag`` in an argv list (last occurrence), or ``default``."""
    value = default
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def common_data_args(cfg: StudyConfig) -> list[str]:
    return ["--data_path", cfg.data_path] if cfg.data_path else []


def default_input_size(cfg: StudyConfig) -> int:
    return 32 if cfg.data_path is None else 224


def model_input_size(cfg: StudyConfig, model: str) -> int:
    """The input size a model trains and is analysed at: ``--input_size`` after ``--`` when given (for
    every model), else the data's default (32 px on the digits, 224 otherwise) when the model takes it,
    else the nearest larger size it takes (U-HaloNet needs sides of 224·k: it gets 224 on the digits)."""
    explicit = _flag_value(cfg.train_args, "--input_size")
    if explicit is not None:
        return int(explicit)
    size = default_input_size(cfg)
    import timm

    from ..models import STUDY_PREFIXES, input_size_error, sizes_that_work

    with contextlib.suppress(ImportError):
        import stm_backbones  # noqa: F401
    kwargs = {"img_size": size} if model.startswith(STUDY_PREFIXES) else {}
    try:
        net = timm.create_model(model, pretrained=False, **kwargs)
    except Exception:  # noqa: BLE001 - the training itself reports what is wrong with the model
        return size
    if input_size_error(net, size) is None:
        return size
    for candidate in sizes_that_work(net, size, count=1, larger_only=True, multiple_of=32):
        print(f"[study] {model} cannot take {size} px inputs; it trains and is analysed at {candidate} px")
        return candidate
    return size


def train_command(cfg: StudyConfig, model: str) -> list[str]:
    cmd = [cfg.python]
    if cfg.launcher == "torchrun":
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc_per_node}"]
    cmd += [str(MAIN_PY), "--model", model, "--output_dir", str(cfg.model_dir(model)), "--seed", str(cfg.seed),
            *common_data_args(cfg)]
    if cfg.epochs is not None:
        cmd += ["--epochs", str(cfg.epochs)]
    if _flag_value(cfg.train_args, "--input_size") is None:
        cmd += ["--input_size", str(cfg.input_sizes[model])]
    return cmd + list(cfg.train_args)


def final_checkpoint(cfg: StudyConfig, model: str) -> Path | None:
    """The trained weights the study evaluates and analyses: the last epoch's checkpoint."""
    if model in cfg.checkpoints:
        return Path(cfg.checkpoints[model])
    found = sorted(((int(m.group(1)), p) for p in cfg.model_dir(model).glob("checkpoint-*.pth")
                    if (m := re.match(r"checkpoint-(\d+)\.pth$", p.name))), reverse=True)
    return found[0][1] if found else None


def train_finished(cfg: StudyConfig, model: str) -> bool:
    """Whether the training's log reaches its last epoch (the folder alone tells, whatever the state says)."""
    log = cfg.model_dir(model) / "log.txt"
    if not log.exists():
        return False
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = cfg.epochs if cfg.epochs is not None else _train_epochs(cfg, model)
    return bool(rows) and epochs is not None and rows[-1].get("epoch") == epochs - 1


def _train_epochs(cfg: StudyConfig, model: str) -> int | None:
    """The epoch count the training ran with (recorded in its checkpoint's args)."""
    ckpt = final_checkpoint(cfg, model)
    if ckpt is None:
        return None
    import torch

    with contextlib.suppress(Exception):
        import argparse

        torch.serialization.add_safe_globals([argparse.Namespace])
        return int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["args"].epochs)
    return None


def parse_accuracy(text: str) -> dict:
    found = ACC_RE.findall(text)
    if not found:
        raise StepFailed("no accuracy line ('* Acc@1 ...') in the evaluation output")
    acc1, acc5, loss, n = found[-1]
    return {"top1": float(acc1), "top5": float(acc5), "loss": float(loss), "num_images": int(n)}


def eval_command(cfg: StudyConfig, model: str, checkpoint: Path) -> list[str]:
    # The training flags again (input size, data, normalisation); --eval ignores the training-only ones.
    size = [] if _flag_value(cfg.train_args, "--input_size") else ["--input_size", str(cfg.input_sizes[model])]
    return [cfg.python, str(MAIN_PY), "--model", model, *common_data_args(cfg), *size, *cfg.train_args,
            "--eval", "true", "--resume", str(checkpoint), "--output_dir", "", "--auto_resume", "false"]


def ema_weights_file(cfg: StudyConfig, model: str, checkpoint: Path) -> Path | None:
    """The EMA weights of a training checkpoint as a file ``main.py --eval`` reads, or None without EMA."""
    from stm_cls.checkpoint import atomic_save, load_file

    ckpt = load_file(str(checkpoint))  # onto the CPU
    if not isinstance(ckpt, dict) or "model_ema" not in ckpt:
        return None
    path = cfg.model_dir(model) / "final-ema-weights.pth"
    atomic_save({"model": ckpt["model_ema"]}, str(path))
    return path


def size_groups(cfg: StudyConfig) -> dict[int, list[str]]:
    """Models by input size: an analysis compares the models of one size in one run (one figure)."""
    groups: dict[int, list[str]] = {}
    for model in cfg.models:
        groups.setdefault(cfg.input_sizes[model], []).append(model)
    return groups


def analysis_dir(cfg: StudyConfig, size: int, name: str) -> Path:
    """OUT/analyses, or OUT/analyses/<size>px when the models do not all share one input size (the cost
    analysis measures every model at 224 px, so it is never split)."""
    if name == "cost" or len(size_groups(cfg)) == 1:
        return cfg.output_dir / "analyses"
    return cfg.output_dir / "analyses" / f"{size}px"


def analysis_command(cfg: StudyConfig, name: str, models: list[str], checkpoints: list[Path], size: int,
                     out_dir: Path) -> list[str]:
    cmd = [cfg.python, str(ANALYZE_PY), name, "--output_dir", str(out_dir), "--seed",
           str(cfg.seed), "--model", *models, "--resume", *map(str, checkpoints), *common_data_args(cfg)]
    if name != "cost":
        cmd += ["--input_size", str(size)]
    nb_classes = _flag_value(cfg.train_args, "--nb_classes")
    if nb_classes:
        cmd += ["--nb_classes", nb_classes]
    if cfg.num_images and name != "cost":
        cmd += ["--num_images", str(cfg.num_images)]
    return cmd + list(cfg.analysis_args)


def fingerprint(*parts) -> str:
    return json.dumps(parts, default=str)


def run_study(cfg: StudyConfig) -> dict:
    """Run (or resume) the study; returns the study.json content."""
    from . import report

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    cfg.input_sizes = {m: model_input_size(cfg, m) for m in cfg.models}
    state = State(cfg.output_dir / "state.json")
    state.data.update(command=shlex.join(sys.argv), models=cfg.models, analyses=cfg.analyses, launcher=cfg.launcher)
    state.save()

    # 1. training (skipped for models given with --checkpoint, and for trainings already finished)
    pending = []
    for model in cfg.models:
        name = f"train:{model}"
        if model in cfg.checkpoints:
            state.update(name, status="done", source="checkpoint", checkpoint=cfg.checkpoints[model])
            continue
        if state.done(name) and train_finished(cfg, model):
            print(f"[study] {name}: done before, skipped")
            continue
        if train_finished(cfg, model):
            print(f"[study] {name}: finished in a previous run (found its log), skipped")
            state.update(name, status="done")
            continue
        cmd = train_command(cfg, model)
        state.update(name, status="running", command=shlex.join(cmd), attempts=state.step(name)["attempts"] + 1,
                     log=str(cfg.model_dir(model) / "train.log"), started=time.time())
        pending.append((model, cmd))
        if cfg.launcher in ("local", "torchrun"):  # one after another: record each as it finishes
            _finish_training(cfg, state, model, run_jobs(cfg, [(cmd, cfg.model_dir(model) / "train.log")])[0])
    if pending and cfg.launcher not in ("local", "torchrun"):
        codes = run_jobs(cfg, [(cmd, cfg.model_dir(m) / "train.log") for m, cmd in pending])
        for (model, _), code in zip(pending, codes):
            _finish_training(cfg, state, model, code)

    checkpoints = {m: final_checkpoint(cfg, m) for m in cfg.models}

    # 2. evaluation of the final weights and of their EMA
    for model in cfg.models:
        name = f"eval:{model}"
        ckpt = checkpoints[model]
        fp = fingerprint(str(ckpt), os.path.getmtime(ckpt))
        if state.done(name, fp):
            print(f"[study] {name}: done before, skipped")
            continue
        log = cfg.model_dir(model) / "eval.log"
        result = {"model": _evaluate(cfg, model, ckpt, log)}
        ema = ema_weights_file(cfg, model, ckpt) if model not in cfg.checkpoints else None
        if ema is not None:
            result["ema"] = _evaluate(cfg, model, ema, log)
        state.update(name, status="done", fingerprint=fp, result=result, log=str(log))

    # 3. analyses: every model of one input size in one run (one figure per analysis and size)
    for analysis in cfg.analyses:
        groups = [(224, cfg.models)] if analysis == "cost" else sorted(size_groups(cfg).items())
        for size, models in groups:
            out_dir = analysis_dir(cfg, size, analysis)
            name = f"analysis:{analysis}" + ("" if out_dir == cfg.output_dir / "analyses" else f"@{size}px")
            cmd = analysis_command(cfg, analysis, models, [checkpoints[m] for m in models], size, out_dir)
            fp = fingerprint(cmd, [os.path.getmtime(checkpoints[m]) for m in models])
            out_json = out_dir / f"{analysis}.json"
            if state.done(name, fp) and out_json.exists():
                print(f"[study] {name}: done before, skipped")
                continue
            log = out_dir / f"{analysis}.log"
            state.update(name, status="running", command=shlex.join(cmd),
                         attempts=state.step(name)["attempts"] + 1, log=str(log))
            print(f"[study] {name}: running (log {log})", flush=True)
            code = run_logged(cmd, log)
            if code != 0 or not out_json.exists():
                state.update(name, status="failed", exit_code=code)
                raise StepFailed(f"{name} failed (exit code {code}); see {log}")
            state.update(name, status="done", fingerprint=fp, exit_code=0, output=str(out_json))

    # 4. the report (always rewritten from the results on disk)
    study = report.collect(cfg, state)
    report.write(cfg, study)
    state.update("report", status="done", output=str(cfg.output_dir / "report.md"))
    return study


def _finish_training(cfg: StudyConfig, state: State, model: str, code: int) -> None:
    name = f"train:{model}"
    log = cfg.model_dir(model) / "train.log"
    if code != 0 or not train_finished(cfg, model):
        state.update(name, status="failed", exit_code=code, finished=time.time())
        raise StepFailed(f"{name} failed (exit code {code}); see {log}. Rerun the same command to resume it.")
    state.update(name, status="done", exit_code=0, finished=time.time())
    print(f"[study] {name}: done", flush=True)


def _evaluate(cfg: StudyConfig, model: str, checkpoint: Path, log: Path) -> dict:
    cmd = eval_command(cfg, model, checkpoint)
    print(f"[study] eval {model} ({checkpoint.name})", flush=True)
    before = log.stat().st_size if log.exists() else 0
    code = run_logged(cmd, log)
    with open(log) as f:
        f.seek(before)
        text = f.read()
    if code != 0:
        raise StepFailed(f"evaluation of {model} ({checkpoint}) failed (exit code {code}); see {log}")
    return parse_accuracy(text)
