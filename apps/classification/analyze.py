"""The study's analyses of classification models, several models side by side.

    python apps/classification/analyze.py {invariance,erf,robustness,cost} \\
        --model NAME [--model NAME2 ...] [--resume CKPT [--resume CKPT2 ...]] \\
        [--data_path DIR] [--input_size S] [--batch_size B] [--num_images N] --output_dir OUT

* invariance: top-1/top-5, consistency and soft cross-entropy under translation, rotation (before or
  after the crop) and scale, against the strength of the transform;
* erf: effective receptive field of each stage (gradient maps and the area they cover);
* robustness: top-1 under FGSM and PGD attacks against eps;
* cost: images/s and peak memory of inference and training steps (fp32 and mixed precision) at the
  classification size, and of the dense (detection) backbones over a resolution sweep, with FLOPs.

Writes OUT/<analysis>.json (every number, per model and setting), OUT/<analysis>.csv and PNG plots.
Without --data_path the embedded digits are used (32 px). Multi-process: torchrun --nproc_per_node N
apps/classification/analyze.py ... (or srun); the numbers equal a single process's exactly.
The protocols: apps/classification/ANALYSES.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see main.py: spinning OpenMP threads on a shared CPU
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stm_cls.analysis import ANALYSES  # noqa: E402
from stm_cls.config import str2bool  # noqa: E402

EXIT_CONFIG_ERROR = 2
EXIT_DATA_ERROR = 4
DIGITS_INPUT_SIZE = 32
ERF_DEFAULT_IMAGES = 500  # the study's


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "analyze.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Booleans accept true/false. Exit codes: 2 bad arguments, model, checkpoint or data layout; "
               "4 unreadable images during the run.")
    p.add_argument("analysis", choices=ANALYSES, help="which analysis to run")
    p.add_argument("--model", action="extend", nargs="+", required=True,
                   help="timm model name(s); repeat --model (or list several) to compare models side by side")
    p.add_argument("--resume", action="extend", nargs="+", default=[],
                   help="checkpoint per model, in --model order (training checkpoint or released weights; "
                        "path or URL). Omitted: random weights (smoke runs only)")
    p.add_argument("--use_ema", default=False, type=str2bool, help="load a training checkpoint's model_ema weights")
    p.add_argument("--output_dir", required=True, help="where <analysis>.json/.csv/.png are written")
    p.add_argument("--data_path", default=None,
                   help="dataset root (the training app's layouts; its val split is used). Unset: the embedded digits")
    p.add_argument("--nb_classes", default=1000, type=int, help="classes of the model head (list layout)")
    p.add_argument("--input_size", default=None, type=int,
                   help="evaluation size S (default: 32 on the digits, else 224; cost: 224)")
    p.add_argument("--batch_size", default=None, type=int,
                   help="images per batch (invariance: views per forward pass; default 64; cost: 128 on a GPU, "
                        "4 on the CPU)")
    p.add_argument("--num_images", default=None, type=int,
                   help="use a seeded random subset of this many validation images (default: all; erf: 500)")
    p.add_argument("--num_workers", default=None, type=int, help="data-loading workers (default: 0 on the digits, else min(8, CPUs))")
    p.add_argument("--crop_pct", default=0.875, type=float, help="reference view: resize to S / crop_pct, centre-crop S")
    p.add_argument("--imagenet_default_mean_and_std", default=True, type=str2bool,
                   help="ImageNet mean/std (false: Inception 0.5/0.5), as the training app")
    p.add_argument("--seed", default=0, type=int, help="seed of the subset, translation directions and PGD starts")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--use_amp", default=None, type=str2bool,
                   help="float16 autocast on CUDA for invariance/robustness (default: true on CUDA; ignored on the CPU)")
    p.add_argument("--reference_quirks", default=False, type=str2bool,
                   help="reproduce the original scripts' bugs: translation directions drawn from 7 of 8, "
                        "post-rotation reported as pre-rotation; ERF image counter advanced per stage (N // 4 images)")
    p.add_argument("--max_failed_images", default=100, type=int, help="stop after this many unreadable images")

    g = p.add_argument_group("invariance")
    g.add_argument("--transforms", nargs="+", default=["translation", "pre_rotation", "post_rotation", "scale"],
                   choices=["translation", "pre_rotation", "post_rotation", "scale"], help="transforms to measure")
    g = p.add_argument_group("erf")
    g.add_argument("--erf_size", default=None, type=int, help="square input size of the ERF (default 2 x S: 448 at 224)")
    g = p.add_argument_group("robustness")
    g.add_argument("--eps", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0, 4.0], help="L-inf budgets in 1/255")
    g.add_argument("--attacks", nargs="+", default=["fgsm", "pgd"], choices=["fgsm", "pgd"], help="attacks")
    g.add_argument("--pgd_steps", default=10, type=int, help="PGD iterations")
    g.add_argument("--pgd_step_ratio", default=0.25, type=float, help="PGD step size as a fraction of eps")
    g = p.add_argument_group("cost")
    g.add_argument("--sizes", nargs="+", type=int, default=None,
                   help="dense-backbone resolution sweep (default: 224 384 512 640 768 1024 on a GPU, 224 320 448 on "
                        "the CPU; multiples of 32)")
    g.add_argument("--dense_batch_size", default=None, type=int, help="batch of the sweep (default 32 GPU, 1 CPU)")
    g.add_argument("--dense", default=True, type=str2bool, help="also sweep the dense (detection) backbones")
    g.add_argument("--warmup", default=None, type=int, help="warm-up iterations (default 10 GPU, 1 CPU)")
    g.add_argument("--iters", default=None, type=int, help="timed iterations (default 100 GPU, 3 CPU)")
    g.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    g.add_argument("--precisions", nargs="+", default=["fp32", "amp"], choices=["fp32", "amp"])

    g = p.add_argument_group("distributed (torchrun / SLURM / OpenMPI environment)")
    g.add_argument("--dist_url", default="env://", help="process-group init URL")
    g.add_argument("--dist_on_itp", default=False, type=str2bool, help="read OpenMPI variables")
    return p


class _Fail(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def validate(args) -> None:
    from stm_cls.analysis import common

    for name in ("batch_size", "num_images", "input_size", "erf_size", "dense_batch_size", "iters", "pgd_steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise common.AnalysisError(f"--{name} must be positive, got {value}")
    if any(e < 0 for e in args.eps):
        raise common.AnalysisError(f"--eps must be >= 0, got {args.eps}")
    if args.sizes and any(s % 32 for s in args.sizes):
        raise common.AnalysisError(f"--sizes must be multiples of 32 (dense backbones), got {args.sizes}")
    common.pair_models(args.model, args.resume)
    common.check_model_names(args.model)
    for path in args.resume:
        if not path.startswith(("http://", "https://")) and not os.path.isfile(path):
            raise common.AnalysisError(f"--resume {path}: file not found")


def resolve_defaults(args) -> None:
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = str(args.device).startswith("cuda")
    if args.use_amp is None:
        args.use_amp = on_gpu
    digits = args.data_path is None
    if args.analysis == "cost":
        from stm_cls.analysis.cost import CPU_DEFAULTS, GPU_DEFAULTS

        defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
        args.input_size = args.input_size or 224
        args.batch_size = args.batch_size or defaults["batch_size"]
        args.dense_batch_size = args.dense_batch_size or defaults["dense_batch_size"]
        args.warmup = defaults["warmup"] if args.warmup is None else args.warmup
        args.iters = args.iters or defaults["iters"]
        args.sizes = args.sizes or list(defaults["sizes"])
        return
    if digits:
        from stm_cls.digits import DIGITS_NUM_CLASSES, ensure_digits_dataset

        args.data_path = ensure_digits_dataset()
        args.nb_classes = DIGITS_NUM_CLASSES
        print(f"[digits] no --data_path: using the embedded digits at {args.data_path}")
    args.input_size = args.input_size or (DIGITS_INPUT_SIZE if digits else 224)
    args.batch_size = args.batch_size or 64
    if args.num_workers is None:
        args.num_workers = 0 if digits else min(8, len(os.sched_getaffinity(0)))
    if args.analysis == "erf":
        args.erf_size = args.erf_size or 2 * args.input_size
        args.num_images = args.num_images or ERF_DEFAULT_IMAGES


def run_analysis(args) -> dict:
    import torch

    from stm_cls import dist_utils
    from stm_cls.analysis import common

    device = torch.device(args.device)
    common.seed_all(args.seed)
    config = {k: v for k, v in vars(args).items() if k not in ("dist_url", "dist_on_itp")}
    config["world_size"] = dist_utils.get_world_size()
    out = os.path.join(args.output_dir, args.analysis)
    labels = [common.model_label(n, i, args.model) for i, n in enumerate(args.model)]

    if args.analysis == "cost":
        from stm_cls.analysis import cost

        if args.resume:
            print("cost: weights do not change the cost; --resume is ignored")
        results = {}
        if dist_utils.is_main_process():  # one device's cost; the other ranks wait
            results = cost.run(list(dict.fromkeys(args.model)), nb_classes=args.nb_classes,
                               input_size=args.input_size, device=device, batch_size=args.batch_size,
                               dense_batch_size=args.dense_batch_size, sizes=args.sizes, warmup=args.warmup,
                               iters=args.iters, dense=args.dense, modes=args.modes, precisions=args.precisions)
            config["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            config["threads"] = torch.get_num_threads()
            common.write_json({"analysis": "cost", "config": config, "models": results}, out + ".json")
            common.write_csv(cost.csv_rows(results), out + ".csv")
            cost.plot(results, out + ".png")
        dist_utils.barrier()
        return results

    mean, std = ((common.IMAGENET_MEAN, common.IMAGENET_STD) if args.imagenet_default_mean_and_std
                 else (common.INCEPTION_MEAN, common.INCEPTION_STD))
    dataset, nb_classes = common.eval_images(args.data_path, args.nb_classes, args.max_failed_images)
    args.nb_classes = config["nb_classes"] = nb_classes
    model_size = args.erf_size if args.analysis == "erf" else args.input_size
    models = {}
    for label, (name, resume) in zip(labels, common.pair_models(args.model, args.resume)):
        net = common.load_model(name, nb_classes, model_size, resume, args.use_ema)
        models[label] = common.Normalized(net, mean, std).to(device).eval()
        print(f"{label}: {name} at {model_size}px, weights {resume or 'random (no --resume)'}")
    indices = common.select_subset(len(dataset), args.num_images, args.seed)
    config["num_images_used"] = len(indices)
    started = time.time()

    if args.analysis == "invariance":
        from stm_cls.analysis import invariance as mod

        results = mod.run(models, dataset, indices, size=args.input_size, crop_pct=args.crop_pct,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          use_amp=args.use_amp, seed=args.seed, quirks=args.reference_quirks,
                          transforms=[t for t in mod.TRANSFORMS if t in args.transforms])

        def files():
            mod.plot(results, out + ".png")

        rows = mod.csv_rows(results)
    elif args.analysis == "erf":
        from stm_cls.analysis import erf as mod

        results, maps = mod.run(models, dataset, indices, size=args.erf_size, batch_size=args.batch_size,
                                num_workers=args.num_workers, device=device, quirks=args.reference_quirks)

        def files():
            mod.plot(results, maps, out + ".png", out + "_area.png")
            common.write_npz({f"{m}/{s}": a for m, stages in maps.items() for s, a in stages.items()},
                             out + "_maps.npz")

        rows = mod.csv_rows(results)
    else:
        from stm_cls.analysis import robustness as mod

        results = mod.run(models, dataset, indices, size=args.input_size, crop_pct=args.crop_pct,
                          batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          use_amp=args.use_amp, seed=args.seed, eps_list=args.eps,
                          attacks=[a for a in mod.ATTACKS if a in args.attacks], steps=args.pgd_steps,
                          step_ratio=args.pgd_step_ratio)

        def files():
            mod.plot(results, out + ".png")

        rows = mod.csv_rows(results)
    config["seconds"] = round(time.time() - started, 1)
    if dist_utils.is_main_process():
        common.write_json({"analysis": args.analysis, "config": config, "models": results}, out + ".json")
        common.write_csv(rows, out + ".csv")
        files()
        print(f"wrote {out}.json, {out}.csv and the plot(s) in {args.output_dir}")
    dist_utils.barrier()
    return results


def print_summary(analysis: str, results: dict) -> None:
    for model, res in results.items():
        if analysis == "invariance":
            parts = [f"clean top-1 {res['clean_top1']:.2f}"]
            for t in ("translation", "pre_rotation", "post_rotation", "scale"):
                if t in res:
                    last = res[t][-1]
                    parts.append(f"{t}@{last['strength']}: top-1 {last['top1']:.2f} cons {last['consistency']:.2f}")
            print(f"{model}: " + "; ".join(parts))
        elif analysis == "erf":
            print(f"{model}: area ratio at t=0.5 per stage: "
                  + ", ".join(f"{s} {v['0.5']['area_ratio']:.4f}" for s, v in res.items())
                  + "; t=0.99: " + ", ".join(f"{v['0.99']['area_ratio']:.4f}" for v in res.values()))
        elif analysis == "robustness":
            parts = [f"clean {res['clean_top1']:.2f}"]
            for a in ("fgsm", "pgd"):
                if a in res:
                    parts.append(a + " " + " ".join(f"{e['eps']:g}:{e['top1']:.2f}" for e in res[a]))
            print(f"{model}: top-1 " + "; ".join(parts))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from stm_cls import dist_utils
    from stm_cls.analysis.common import AnalysisError
    from stm_cls.datasets import DatasetError, UnreadableDataError

    try:
        try:
            validate(args)
            resolve_defaults(args)
            dist_utils.init_distributed(args)
            results = run_analysis(args)
        except (AnalysisError, DatasetError) as exc:
            raise _Fail(str(exc), EXIT_CONFIG_ERROR) from None
        except UnreadableDataError as exc:
            raise _Fail(str(exc), EXIT_DATA_ERROR) from None
    except _Fail as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        dist_utils.cleanup_distributed()
        return exc.code
    if dist_utils.is_main_process():
        print_summary(args.analysis, results)
    dist_utils.cleanup_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
