"""Classify your own images with a trained checkpoint: top-k table, predictions.json and a PNG grid.

    python apps/classification/predict.py --model unified_convnext_micro \
        --checkpoint output/digits/checkpoint-best.pth --output output/digits/predict my_digits/ photo.png "more/*.jpg"

Inputs are files, folders (searched recursively) or glob patterns. The preprocessing is the eval transform
the checkpoint was trained with (recorded in its args), else the model's pretrained_cfg; --input_size
overrides the size. Class names: --class_names FILE, else those recorded in the checkpoint (the digits'
0-9, a class-folder dataset's folder names), else ImageNet-1k's for 1000 classes, else class_<i>.

Exit codes: 0 every image classified; 1 some inputs were unreadable or matched nothing (listed on
stderr, the others are still classified and written); 2 bad arguments (no checkpoint, no images,
checkpoint that does not fit the model, ...), printed as ``ERROR: ...``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see main.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EXIT_SKIPPED = 1
EXIT_BAD_ARGS = 2
GRID_MAX_DEFAULT = 48


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # the app's error convention instead of argparse's usage dump
        self.print_usage(sys.stderr)
        print(f"ERROR: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_ARGS)


def get_args_parser() -> argparse.ArgumentParser:
    p = _Parser("Classify images with a trained checkpoint", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog="Exit codes: 0 all images classified; 1 some inputs unreadable or matching nothing (listed "
                       "and skipped); 2 bad arguments.")
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--checkpoint", required=True, help="a main.py checkpoint (checkpoint-best.pth, ...) or a "
                                                       "weights-only file; read weights-only")
    p.add_argument("--model", default=None,
                   help="timm model name (default: the one recorded in the checkpoint)")
    p.add_argument("--output", default=None, help="folder for predictions.json and predictions.png (unset: table only)")
    p.add_argument("--topk", default=5, type=int, help="classes listed per image (at most the number of classes)")
    p.add_argument("--class_names", default=None, help="text file with one class name per line, in label order")
    p.add_argument("--input_size", default=None, type=int, help="override the recorded eval image size")
    p.add_argument("--batch_size", default=32, type=int, help="images per forward pass")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights ('model_ema')")
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--grid_max", default=GRID_MAX_DEFAULT, type=int, help="at most this many images in the PNG grid")
    return p


def _fail(message: str) -> int:
    print(f"ERROR: {message}", file=sys.stderr)
    return EXIT_BAD_ARGS


def main(argv=None) -> int:
    cli = get_args_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if cli.topk < 1 or cli.batch_size < 1 or (cli.input_size is not None and cli.input_size < 1) or cli.grid_max < 0:
        return _fail("--topk, --batch_size and --input_size must be >= 1, --grid_max >= 0")
    if not cli.images:
        return _fail("no images given (pass files, folders or glob patterns)")
    if not os.path.isfile(cli.checkpoint) and not cli.checkpoint.startswith(("http://", "https://")):
        return _fail(f"--checkpoint not found: {cli.checkpoint}")

    from stm_cls import predict as P  # heavy imports (torch, timm) only once the arguments are known

    inputs = P.expand_inputs(cli.images)
    for item in inputs.missing:
        print(f"WARNING: {item!r} matches no file", file=sys.stderr)
    if not inputs.images:
        return _fail(f"no images found in {', '.join(map(repr, cli.images))}")
    try:
        predictor = P.load_predictor(cli)
    except P.PredictError as exc:
        return _fail(str(exc))
    c = predictor.config
    print(f"Model {predictor.model_name}: {len(predictor.names)} classes (names: {predictor.names_source}); transform: {c['crop_mode']} "
          f"{c['input_size']} px, crop_pct {c['crop_pct']}, {c['interpolation']}, mean {c['mean']}, std {c['std']}")

    keep = cli.grid_max if cli.output else 0
    results, skipped, thumbs = P.predict(predictor, inputs.images, cli.topk, cli.batch_size, keep_thumbnails=keep)
    print(P.format_table(results, cli.topk))
    if cli.output:
        os.makedirs(cli.output, exist_ok=True)
        json_path = os.path.join(cli.output, P.JSON_NAME)
        P.write_json(results, json_path)
        print(f"Wrote {json_path} ({len(results)} images)")
        if results:
            grid_path = os.path.join(cli.output, P.GRID_NAME)
            drawn = P.write_grid(results, thumbs, grid_path)
            more = f"; the first {drawn} of {len(results)} (--grid_max)" if drawn < len(results) else ""
            print(f"Wrote {grid_path}{more}")
    problems = [(p, r) for p, r in skipped] + [(m, "matches no file") for m in inputs.missing]
    if problems:
        print(f"{len(problems)} input(s) skipped:", file=sys.stderr)
        for path, reason in problems:
            print(f"  {path}: {reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
