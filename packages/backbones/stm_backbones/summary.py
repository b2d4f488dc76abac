"""Parameter / FLOP report of a model: `python -m stm_backbones.summary MODEL [--img-size 224]`.

FLOPs are fvcore's count (one fused multiply-add = one FLOP), the convention of the study's tables. fvcore
counts matmuls, convolutions, norms, bilinear/nearest upsampling, adaptive average pooling and grid sampling,
and skips element-wise and data-movement operators on purpose; every other operator it meets (pooling,
softmax, reductions, other interpolations, custom ops such as the deformable sampling) does work that the
figure leaves out, and the report names it under "not counted".
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


# Operators whose cost fvcore leaves out on purpose (element-wise math, comparisons, copies, shape and indexing
# ops, tensor creation), by base name without surrounding underscores: "aten::add_" -> "add",
# "aten::_unsafe_view" -> "unsafe_view", "aten::__and__" -> "and". Every other uncounted operator is reported.
ELEMENTWISE_OPS = frozenset("""
    abs add addcdiv addcmul alias bitwise_and bitwise_not bitwise_or bitwise_xor ceil clamp clamp_max clamp_min
    clone copy cos div dropout elu eq erf exp expm1 fill floor floor_divide fmod frac ge gelu gt hardsigmoid
    hardswish hardtanh le leaky_relu lerp lift_fresh log log1p log_sigmoid logical_and logical_not logical_or lt
    masked_fill maximum minimum mish mul ne neg pow reciprocal relu relu6 remainder round rsqrt rsub sigmoid sign
    silu sin softplus sqrt square sub tanh true_divide trunc where zero
    Int IntImplicit Float FloatImplicit ScalarImplicit arange as_strided chunk constant_pad_nd contiguous detach
    dim empty empty_like expand expand_as flatten flip full full_like gather index index_put index_select item
    linspace masked_select meshgrid movedim narrow new_empty new_full new_ones new_zeros numel ones ones_like pad
    permute repeat reshape roll scalar_tensor scatter select size slice split split_with_sizes squeeze stack cat
    t tensor to transpose type_as unbind unflatten unfold unsqueeze view view_as zeros zeros_like
    and or xor not getitem unsafe_view reshape_alias to_copy
""".split())


def not_counted(uncounted_ops: dict[str, int]) -> dict[str, int]:
    """The operators of fvcore's `unsupported_ops()` that do more than element-wise work (pooling, softmax,
    reductions, interpolation other than bilinear/nearest, custom and Python ops), with their counts."""
    def base(op: str) -> str | None:
        if not op.startswith("aten::"):
            return None  # a custom op (prim::PythonOp.*, stm_cuda_ops::*, ...)
        return op[len("aten::"):].strip("_")

    return {op: n for op, n in uncounted_ops.items() if base(op) not in ELEMENTWISE_OPS}


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
                stage_shapes=stage_shapes(model, image), uncounted_ops=unsupported,
                not_counted=not_counted(unsupported))


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
    # fvcore deliberately skips element-wise ops; name every other operator it left out.
    skipped = not_counted(report["uncounted_ops"])
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
        print("| model | params (M) | GFLOPs | not counted |\n|---|---:|---:|---|")
        for name in list_models():
            try:
                report = summarize(name, args.img_size)
            except ValueError as error:  # a size the model cannot take (e.g. Halo needs multiples of 224)
                print(f"| {name} | - | - | {str(error).splitlines()[0]} |", flush=True)
                continue
            skipped = ", ".join(sorted(report["not_counted"])) or "-"
            print(f"| {name} | {report['params'] / 1e6:.2f} | {report['gflops']:.3f} | {skipped} |", flush=True)
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
