"""Run the study: train every model under one recipe, evaluate, analyse, and write the comparison report.

    python apps/classification/study.py --output_dir output/study          # five micro models on the digits
    python apps/classification/study.py --models unified_swin_tiny unified_convnext_tiny --data_path /data/imagenet \\
        --epochs 300 --launcher slurm --gpus_per_job 8 --output_dir output/study_tiny -- --batch_size 128
    python apps/classification/study.py --models unified_halo_tiny --checkpoint unified_halo_tiny=unified_halonet_tiny.pth \\
        --data_path /data/imagenet --analyses invariance,robustness --output_dir output/released

Flags after ``--`` go to every training (``main.py``; e.g. ``--input_size``, ``--batch_size``, ``--lr``)
and to the evaluations. Rerunning the same command resumes a killed study: finished steps are skipped
(``OUT/state.json``), an unfinished training resumes from its newest checkpoint.
Writes ``OUT/report.md``, ``OUT/report.html`` (self-contained) and ``OUT/study.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see main.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stm_cls.study.runner import ANALYSES, LAUNCHERS, default_models  # noqa: E402

DIGITS_ANALYSIS_IMAGES = 100
EXIT_CONFIG_ERROR = 2
EXIT_STEP_FAILED = 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("study.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Exit codes: 0 done, 1 a step failed (rerun to resume), 2 bad arguments.")
    p.add_argument("--models", nargs="+", default=None,
                   help="timm model names (any registered model); default: the smallest model of each of the "
                        "study's mixers (stm_backbones.list_families(study=True): the five micro models)")
    p.add_argument("--output_dir", required=True, help="the study's folder (trainings, analyses, report, state)")
    p.add_argument("--data_path", default=None, help="dataset root as for main.py (unset: the embedded digits)")
    p.add_argument("--epochs", default=None, type=int, help="training epochs (unset: main.py's default for the data)")
    p.add_argument("--analyses", default=",".join(ANALYSES),
                   help=f"comma-separated subset of {','.join(ANALYSES)} ('' or none: no analysis)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                   help="use these weights for MODEL instead of training it (repeatable), e.g. a released file")
    p.add_argument("--launcher", default="local", choices=LAUNCHERS,
                   help="local: one training after another; torchrun: --nproc_per_node processes per training; "
                        "slurm: one submitit SLURM job per training (run in parallel, waited for); "
                        "submitit_local: submitit's local executor (the slurm path on this machine)")
    p.add_argument("--nproc_per_node", default=1, type=int, help="torchrun processes per training")
    p.add_argument("--gpus_per_job", default=1, type=int, help="slurm: GPUs (= tasks) per training job")
    p.add_argument("--partition", default=None, help="slurm partition")
    p.add_argument("--timeout_min", default=60 * 24, type=int, help="slurm/submitit job time limit in minutes")
    p.add_argument("--seed", default=0, type=int, help="seed of every training and analysis")
    p.add_argument("--num_images", default=None, type=int,
                   help="validation images per analysis (a seeded subset, the same for every model). Unset: "
                        f"{DIGITS_ANALYSIS_IMAGES} on the embedded digits (keeps the CPU study short: U-HaloNet is "
                        "analysed at 224 px there), else each analysis's default (all images; ERF 500)")
    p.add_argument("--analysis_args", default="", help="extra analyze.py flags for every analysis, as one string")
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    args = get_args_parser().parse_args(argv)
    if args.models is None:
        args.models = default_models()
    args.train_args = train_args
    return args


def build_config(args):
    import shlex

    from stm_cls.study.runner import StudyConfig, StudyError

    analyses = [a.strip() for a in args.analyses.split(",") if a.strip() and a.strip() != "none"]
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise StudyError(f"unknown analysis {unknown}; choose from {', '.join(ANALYSES)}")
    if len(set(args.models)) != len(args.models):
        raise StudyError(f"--models lists a model twice: {args.models}")
    import timm

    try:
        import stm_backbones  # noqa: F401  (registers the unified models)
    except ImportError:
        pass
    missing = [m for m in args.models if not timm.is_model(m)]
    if missing:
        raise StudyError(f"unknown model(s) {missing}; see `python -m stm_backbones.summary --all` or timm.list_models()")
    checkpoints = {}
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise StudyError(f"--checkpoint takes MODEL=PATH, got {item!r}")
        if name not in args.models:
            raise StudyError(f"--checkpoint {item}: {name} is not one of --models")
        if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
            raise StudyError(f"--checkpoint {item}: file not found")
        checkpoints[name] = path
    for flag, value in (("--epochs", args.epochs), ("--num_images", args.num_images),
                        ("--nproc_per_node", args.nproc_per_node), ("--gpus_per_job", args.gpus_per_job)):
        if value is not None and value < 1:
            raise StudyError(f"{flag} must be >= 1, got {value}")
    for forbidden in ("--model", "--output_dir", "--resume", "--eval"):
        if forbidden in args.train_args:
            raise StudyError(f"{forbidden} is set by the study for each model; remove it from the training flags")
    if args.data_path is not None and not os.path.isdir(args.data_path):
        raise StudyError(f"--data_path {args.data_path}: directory not found")
    num_images = args.num_images
    if num_images is None and args.data_path is None:
        num_images = DIGITS_ANALYSIS_IMAGES
        print(f"[study] embedded digits: analyses on a seeded subset of {num_images} validation images "
              "(--num_images to change)")
    return StudyConfig(models=list(args.models), output_dir=Path(args.output_dir).resolve(), data_path=args.data_path,
                       epochs=args.epochs, analyses=analyses, checkpoints=checkpoints, launcher=args.launcher,
                       nproc_per_node=args.nproc_per_node, gpus_per_job=args.gpus_per_job,
                       slurm_partition=args.partition, timeout_min=args.timeout_min, seed=args.seed,
                       num_images=num_images, analysis_args=shlex.split(args.analysis_args),
                       train_args=list(args.train_args))


def main(argv=None) -> int:
    args = parse_args(argv)
    from stm_cls.study.runner import StepFailed, StudyError, run_study

    try:
        cfg = build_config(args)
        run_study(cfg)
    except StudyError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except StepFailed as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return EXIT_STEP_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
