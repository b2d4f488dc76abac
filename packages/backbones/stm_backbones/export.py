"""Export a unified model to ONNX or to a torch.export program (`.pt2`) for deployment.

    python -m stm_backbones.export unified_convnext_tiny --checkpoint ckpt.pth --format onnx --output model.onnx
    python -m stm_backbones.export unified_swin_micro --dense --img-size 512 768 --format pt2 --output swin.pt2

The batch dimension is dynamic. Height and width (multiples of 32, from 32 to 4096) are dynamic too where the
model's graph allows it (`DYNAMIC_HW_*`: ConvNeXt and PVT-v2 classifiers; ConvNeXt and PVT dense
backbones); the others are exported for the given `--img-size` only, and the command says which axes are dynamic.
The exported graph does not repeat the model's Python input-size checks: feed it the sizes the model takes.

The deformable sampling of DCNv3 is exported as its `grid_sample` formulation (`stm_cuda_ops.use_reference()`:
the op's pure-PyTorch reference, the same function as the compiled op up to float rounding), which ONNX
(GridSample, opset >= 16) and any PyTorch runtime execute without the `stm_cuda_ops` extension.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

import torch
from torch import nn

import stm_cuda_ops

from .checkpoint import load_checkpoint, load_into_dense_backbone
from .dense import create_dense_backbone
from .registry import create_model

FORMATS = ("onnx", "pt2")
ONNX_OPSET = 18
# Models whose exported graph stays symbolic in height and width (checked by tests/test_export.py). The others
# specialise on the map size: Halo (block-grid padding branches), DCNv3 (reference points built from the image
# size as Python ints), the fixed-size classifiers of Swin / PVT (window masks, position embeddings), and Swin's
# dense trunk (torch.export takes it, but the ONNX exporter cannot broadcast its symbolic window-count masks).
DYNAMIC_HW_CLASSIFIERS = ("unified_convnext_", "unified_pvt_v2_", "official_pvt_v2_")
DYNAMIC_HW_DENSE = ("unified_convnext_", "unified_pvt_", "official_pvt_v2_")
MAX_BATCH = 1024
MAX_SIDE_32 = 128  # height and width up to 4096 pixels


class ExportError(RuntimeError):
    """A model could not be exported (the message says why and what to try)."""


class _Outputs(nn.Module):
    """Dense backbones return a list of maps; exporters want a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return tuple(self.model(x))


def build(name: str, checkpoint: str | None = None, dense: bool = False, img_size: Sequence[int] | None = None,
          num_classes: int | None = None) -> nn.Module:
    """The model to export, in eval mode, with `checkpoint` loaded by the package's loader."""
    kwargs = {}
    if img_size is not None and not dense:
        kwargs["img_size"] = tuple(img_size)
    if dense:
        model = create_dense_backbone(name, drop_path_rate=0.0)
        if checkpoint:
            load_into_dense_backbone(model, checkpoint)
    else:
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = create_model(name, **kwargs)
        if checkpoint:
            load_checkpoint(model, checkpoint, finetune=num_classes is not None)
    return model.eval()


def dynamic_hw_possible(name: str, dense: bool) -> bool:
    """Whether height and width can be symbolic for this model (see DYNAMIC_HW_*)."""
    return name.startswith(DYNAMIC_HW_DENSE if dense else DYNAMIC_HW_CLASSIFIERS)


def _dynamic_shapes(dynamic_hw: bool):
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dims = {0: batch}
    if dynamic_hw:
        dims[2] = 32 * torch.export.Dim("height_32", min=1, max=MAX_SIDE_32)
        dims[3] = 32 * torch.export.Dim("width_32", min=1, max=MAX_SIDE_32)
    return {"x": dims}


def export_program(model: nn.Module, example: torch.Tensor, dynamic_hw: bool) -> torch.export.ExportedProgram:
    """torch.export of `model` (dynamic batch, and height/width when `dynamic_hw`)."""
    wrapped = _Outputs(model) if getattr(model, "dense", False) else model
    # torch.export specialises axes whose example size is 1 (batch 1, or a 32-pixel side = 1·32): trace with 2
    batch, channels, height, width = example.shape
    if dynamic_hw:
        height, width = (64 if n == 32 else n for n in (height, width))
    if (batch, height, width) != tuple(example.shape[:1]) + tuple(example.shape[2:]) or batch == 1:
        example = torch.randn(max(batch, 2), channels, height, width, dtype=example.dtype, device=example.device)
    with stm_cuda_ops.use_reference(), torch.no_grad():  # the grid_sample formulation
        return torch.export.export(wrapped, (example,), dynamic_shapes=_dynamic_shapes(dynamic_hw), strict=False)


def program_with_fallback(model: nn.Module, example: torch.Tensor, dynamic_hw: bool):
    """(program, dynamic_hw, notes): `export_program`, retried with static height/width when the graph specialises
    on the map size."""
    try:
        return export_program(model, example, dynamic_hw), dynamic_hw, []
    except Exception as error:  # noqa: BLE001 - retried with a static size, reported
        if not dynamic_hw:
            raise ExportError(f"torch.export failed: {type(error).__name__}: {error}") from error
        note = (f"height/width are static ({example.shape[2]}x{example.shape[3]}): the graph specialises on the map "
                f"size ({type(error).__name__})")
    return export_program(model, example, False), False, [note]


def write_program(program: torch.export.ExportedProgram, fmt: str, output: str | os.PathLike,
                  num_outputs: int = 1) -> None:
    """Write an exported program as `.pt2` (torch.export.save) or ONNX, atomically (temp file, then rename)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    output = os.fspath(output)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix="." + fmt, dir=folder)
    os.close(fd)
    try:
        if fmt == "pt2":
            torch.export.save(program, tmp)
        else:
            _save_onnx(program, tmp, num_outputs)
        os.replace(tmp, output)
    finally:
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)


def export(model: nn.Module, fmt: str, output: str | os.PathLike, example: torch.Tensor,
           dynamic_hw: bool = False) -> dict:
    """Export `model` to `output`. Returns what was exported: format, output, dynamic axes, notes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    program, dynamic_hw, notes = program_with_fallback(model, example, dynamic_hw)
    write_program(program, fmt, output, len(model.out_indices) if getattr(model, "dense", False) else 1)
    return dict(format=fmt, output=os.fspath(output), dynamic_batch=True, dynamic_hw=dynamic_hw, notes=notes)


def _save_onnx(program: torch.export.ExportedProgram, path: str, outputs: int) -> None:
    """torch.onnx's exporter on the exported program (opset 18: GridSample for the deformable sampling)."""
    with stm_cuda_ops.use_reference():
        onnx_program = torch.onnx.export(
            program, dynamo=True, opset_version=ONNX_OPSET, input_names=["x"],
            output_names=[f"out{i}" for i in range(outputs)] if outputs > 1 else ["logits"], optimize=False,
            verbose=False)
    onnx_program.save(path, external_data=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stm_backbones.export", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="registered model name, e.g. unified_swin_tiny")
    parser.add_argument("--checkpoint", help="weights to load (path or URL; the package's loader rules)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2 (torch.export)")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--dense", action="store_true", help="export the dense (detection) backbone: 4 feature maps")
    parser.add_argument("--img-size", type=int, nargs="+", metavar="N",
                        help="example/classifier input size: one side or height width (default: the model's, 224)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the example input (the axis is dynamic)")
    parser.add_argument("--num-classes", type=int, help="classifier size (default: the checkpoint's / 1000)")
    return parser.parse_args(argv)


def _fail(message: str) -> int:
    print(f"ERROR: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.img_size is not None and len(args.img_size) not in (1, 2):
        return _fail("--img-size takes one side or height and width")
    size = None if args.img_size is None else (tuple(args.img_size) * 2)[:2]
    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        model = build(args.model, args.checkpoint, dense=args.dense, img_size=size, num_classes=args.num_classes)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        return _fail(str(error))
    height, width = size or getattr(model, "img_size", (224, 224))
    example = torch.randn(args.batch_size, getattr(model, "in_chans", 3), height, width)
    try:
        with torch.no_grad():
            model(example)  # the model's own input checks, with their messages
        result = export(model, args.format, args.output, example,
                        dynamic_hw=dynamic_hw_possible(args.model, args.dense))
    except (ValueError, ExportError) as error:
        return _fail(str(error))
    axes = "batch, height, width (multiples of 32)" if result["dynamic_hw"] else "batch"
    print(f"wrote {result['output']} ({args.format}; dynamic: {axes})")
    for note in result["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
