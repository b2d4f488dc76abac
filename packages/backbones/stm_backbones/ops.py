"""Multi-scale deformable attention (the DCNv3 sampling op, `deformable_op.md`) for the DCNv3 block.

`ms_deform_attn` uses the compiled kernels of `stm_cuda_ops` when that package imports and has its
extension built; otherwise it falls back to `ms_deform_attn_pytorch` (the grid_sample formulation,
`deformable_op.md` §5) after a one-time warning. Either way the op runs in float32 (float64 inputs stay
float64): under autocast its inputs are cast and autocast is disabled around it, as in the reference.

Sampling convention (`deformable_op.md` §2): locations are normalised (x, y) in [0, 1] with pixel centres
at (i + 0.5) / size; bilinear interpolation; everything outside the map counts as 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

BUILD_COMMAND = "nox -s build_ops"

# Resolved on the first call (so that importing stm_backbones never loads the extension).
_dispatch_state: dict = {"resolved": False, "compiled": None, "warned": False}


def reset_dispatch() -> None:
    """Forget which implementation was chosen (and whether the fallback warned); mainly for tests."""
    _dispatch_state.update(resolved=False, compiled=None, warned=False)


def _resolve_compiled() -> Callable | None:
    if not _dispatch_state["resolved"]:
        compiled = None
        try:
            import stm_cuda_ops
        except Exception:  # noqa: BLE001 - not installed, or broken: use the fallback
            stm_cuda_ops = None
        if stm_cuda_ops is not None:
            has_op = getattr(stm_cuda_ops, "has_compiled_op", None)
            try:
                if has_op is not None and has_op():
                    compiled = stm_cuda_ops.ms_deform_attn
            except Exception:  # noqa: BLE001
                compiled = None
        _dispatch_state.update(resolved=True, compiled=compiled)
    return _dispatch_state["compiled"]


def compiled_op_available() -> bool:
    """Whether `ms_deform_attn` runs the compiled kernels of `stm_cuda_ops`.

    Also resolves the choice. The DCNv3 block calls it at construction, so that `stm_cuda_ops` is never
    first imported while a forward is being traced (jit.trace, torch.compile).
    """
    return _resolve_compiled() is not None


def _warn_fallback() -> None:
    if not _dispatch_state["warned"]:
        _dispatch_state["warned"] = True
        warnings.warn(
            "stm_backbones: the compiled deformable-attention op of stm_cuda_ops is missing (the package is not "
            "installed or its extension is not built); DCNv3 blocks use the slower pure-PyTorch grid_sample "
            f"implementation. Build the op with `{BUILD_COMMAND}` (needs a C++/CUDA toolchain).",
            RuntimeWarning, stacklevel=3)


def _level_shapes(spatial_shapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes, level_start_index: torch.Tensor | None,
                           sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch multi-scale deformable attention (grid_sample, zero padding, align_corners=False).

    value (N, S, M, D); spatial_shapes (L, 2) rows (H_l, W_l) as an int64 tensor or a sequence of int
    pairs (pass Python ints to avoid a device sync); sampling_locations (N, Lq, M, L, P, 2) normalised
    (x, y); attention_weights (N, Lq, M, L, P). Levels are taken consecutively along S (that is what
    `level_start_index` describes). Returns (N, Lq, M·D), channel m·D + d.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = _level_shapes(spatial_shapes)
    if len(shapes) != levels:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels, sampling_locations {levels}")
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] frame
    samples = []
    start = 0
    for level, (height, width) in enumerate(shapes):
        chunk = value[:, start:start + height * width]
        start += height * width
        chunk = chunk.flatten(2).transpose(1, 2).reshape(batch * heads, head_dim, height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N·M, Lq, P, 2)
        samples.append(F.grid_sample(chunk, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(samples, dim=-2).flatten(-2)  # (N·M, D, Lq, L·P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (sampled * weights).sum(-1).view(batch, heads * head_dim, queries)
    return out.transpose(1, 2).contiguous()


class _TracedFallback(torch.autograd.Function):
    """The fallback as one opaque node for `torch.jit.trace` (as the reference's CUDA op appears there).

    Used only while jit-tracing (e.g. fvcore's FLOP counter, which then leaves the sampling uncounted,
    as it did for the reference). The backward recomputes the forward with autograd.
    """

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, shapes):
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.shapes = shapes
        return ms_deform_attn_pytorch(value, shapes, None, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = ms_deform_attn_pytorch(inputs[0], ctx.shapes, None, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        return (*grads, None)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError, ValueError):  # device types autocast does not know (meta, ...)
        return False


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64,
                   static_shapes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Multi-scale deformable attention, compiled when available (see the module docstring).

    Same arguments as `stm_cuda_ops.ms_deform_attn`; `static_shapes` optionally gives `spatial_shapes`
    as Python ints for the fallback (avoids reading the tensor back from the device). `im2col_step` is
    an execution detail and any batch size works.

    Runs in float32 (float64 stays float64). Under autocast the result is float32; otherwise it is cast
    back to `value`'s dtype.
    """
    out_dtype = value.dtype
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    value, sampling_locations, attention_weights = (
        t.to(compute) for t in (value, sampling_locations, attention_weights))
    device_type = value.device.type
    if _autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            return _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                        im2col_step, static_shapes)
    return _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step,
                static_shapes).to(out_dtype)


def _run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step,
         static_shapes):
    compiled = _resolve_compiled()
    if compiled is not None:
        return compiled(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                        im2col_step)
    _warn_fallback()
    shapes = static_shapes if static_shapes is not None else spatial_shapes
    if torch.jit.is_tracing():
        return _TracedFallback.apply(value, sampling_locations, attention_weights, _level_shapes(shapes))
    return ms_deform_attn_pytorch(value, shapes, level_start_index, sampling_locations, attention_weights)
