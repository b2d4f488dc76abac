"""Multi-scale deformable attention (the DCNv3 sampling op, `deformable_op.md`) for the DCNv3 block.

The op is `stm_cuda_ops.ms_deform_attn` (a dependency of this package): its compiled kernels when the
extension is built, else its pure-PyTorch reference after one warning (`stm_cuda_ops.use_reference()`
selects the reference on purpose, as the ONNX export does). This module adds the study's precision rule:
the op runs in float32 (float64 inputs stay float64); under autocast its inputs are cast and autocast is
disabled around it, as in the reference implementation.

Sampling convention (`deformable_op.md` §2): locations are normalised (x, y) in [0, 1] with pixel centres
at (i + 0.5) / size; bilinear interpolation; everything outside the map counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from .fast.autocast import autocast_enabled

# `stm_cuda_ops`, imported on first use: importing stm_backbones never loads the compiled extension.
_CUDA_OPS: list[ModuleType] = []


def _cuda_ops() -> ModuleType:
    if not _CUDA_OPS:
        try:
            import stm_cuda_ops
        except ImportError as exc:
            raise ImportError(
                "stm_backbones needs the stm_cuda_ops package for DCNv3's deformable sampling (it imports "
                "without its compiled extension): pip install --no-deps --no-build-isolation -e packages/cuda_ops, "
                "or `nox -s build_ops`") from exc
        _CUDA_OPS.append(stm_cuda_ops)
    return _CUDA_OPS[0]


def compiled_op_available() -> bool:
    """Whether `ms_deform_attn` runs the compiled kernels of `stm_cuda_ops` (else its pure-PyTorch reference).

    Also imports `stm_cuda_ops`. The DCNv3 block calls it at construction, so that the package is never
    first imported while a forward is being traced (jit.trace, torch.compile).
    """
    return _cuda_ops().has_compiled_op()


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64,
                   static_shapes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """`stm_cuda_ops.ms_deform_attn` in float32 (float64 stays float64); see the module docstring.

    `static_shapes` optionally gives `spatial_shapes` as Python ints for the pure-PyTorch path (avoids
    reading the tensor back from the device). `im2col_step` is an execution detail and any batch size works.
    Under autocast the result is float32; otherwise it is cast back to `value`'s dtype.
    """
    cuda_ops = _cuda_ops()
    cuda_ops.check_tensor_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype = value.dtype
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    value, sampling_locations, attention_weights = (
        t.to(compute) for t in (value, sampling_locations, attention_weights))
    device_type = value.device.type
    if autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return cuda_ops.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, im2col_step, static_shapes=static_shapes)
    return cuda_ops.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                                   im2col_step, static_shapes=static_shapes).to(out_dtype)
