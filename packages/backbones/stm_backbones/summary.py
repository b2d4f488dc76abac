"""Parameter / FLOP report of a model: `python -m stm_backbones.summary MODEL [--img-size 224]`.

FLOPs are fvcore's count (one fused multiply-add = one FLOP), the convention of the study's tables.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from math import prod

import torch

from .registry import create_model, list_models


def _sdpa_flop_handle(inputs, outputs):
    """fvcore has no handle for fused attention: count it as the two matmuls it replaces."""
    query, key, value = (i.type().sizes() for i in inputs[:3])
    batch = prod(query[:-2])
    return batch * query[-2] * key[-2] * (query[-1] + value[-1])


def count_flops(model: torch.nn.Module, image: torch.Tensor) -> tuple[float, dict[str, int]]:
    """fvcore FLOPs of one forward (eval mode) and the operators fvcore could not count."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model.eval(), image)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_handle)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = analysis.total()
        return float(total), dict(analysis.unsupported_ops())


def stage_shapes(model: torch.nn.Module, image: torch.Tensor) -> list[tuple[int, ...]]:
    with torch.no_grad():
        features = model.forward_intermediates(image, intermediates_only=True)
    return [tuple(f.shape) for f in features]


def summarize(name: str, img_size: int = 224, num_classes: int = 1000) -> dict:
    kwargs = dict(num_classes=num_classes)
    if img_size != 224:
        kwargs["img_size"] = img_size
    model = create_model(name, **kwargs).eval()
    image = torch.zeros(1, 3, img_size, img_size)
    params = sum(p.numel() for p in model.parameters())
    flops, unsupported = count_flops(model, image)
    return dict(model=name, img_size=img_size, params=params, gflops=flops / 1e9,
                stage_shapes=stage_shapes(model, image), uncounted_ops=unsupported)


def format_summary(report: dict) -> str:
    lines = [
        f"model        {report['model']}",
        f"input        1x3x{report['img_size']}x{report['img_size']}",
        f"params       {report['params']:,} ({report['params'] / 1e6:.2f} M)",
        f"FLOPs        {report['gflops']:.4f} G (fvcore)",
        "stage  stride  output shape (B, C, H, W)",
    ]
    for i, shape in enumerate(report["stage_shapes"]):
        lines.append(f"{i:>5}  {4 * 2**i:>6}  {shape}")
    # fvcore deliberately skips element-wise ops; only name skipped ops that do real work.
    skipped = {k: v for k, v in report["uncounted_ops"].items() if "grid_sampler" in k or not k.startswith("aten::")}
    if skipped:
        lines.append("not counted  " + ", ".join(f"{k} x{v}" for k, v in sorted(skipped.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stm_backbones.summary", description=__doc__)
    parser.add_argument("models", nargs="*", help="model names (default: --all)")
    parser.add_argument("--img-size", type=int, default=224, help="square input size (default 224)")
    parser.add_argument("--all", action="store_true", help="one table row per registered model")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.all or not args.models:
        print("| model | params (M) | GFLOPs |\n|---|---:|---:|")
        for name in list_models():
            report = summarize(name, args.img_size)
            print(f"| {name} | {report['params'] / 1e6:.2f} | {report['gflops']:.3f} |", flush=True)
        return 0
    for name in args.models:
        try:
            print(format_summary(summarize(name, args.img_size)))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
