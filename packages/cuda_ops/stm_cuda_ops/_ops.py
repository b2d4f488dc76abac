"""Python side of the compiled op: loading, fake (meta) kernels, autograd, the public wrapper and its
one fallback (the pure-PyTorch reference, with one warning per reason)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from .reference import check_tensor_args, grid_sample_msda, level_sizes, ms_deform_attn_reference

__all__ = ["BUILD_COMMAND", "build_info", "has_compiled_op", "ms_deform_attn", "use_reference"]

# How to build the extension (from the repository root); the one build hint of the fallback warning.
BUILD_COMMAND = "nox -s build_ops"

try:  # Loading the library runs its TORCH_LIBRARY registrations (torch.ops.stm_cuda_ops.*).
    from . import _C  # noqa: F401

    _LOAD_ERROR: str | None = None
except ImportError as exc:  # not built (no compiler), or built against another torch
    _C = None
    _here = Path(__file__).resolve().parent
    if not any(_here.glob("_C*.so")) and not any(_here.glob("_C*.pyd")):
        _LOAD_ERROR = f"the compiled extension stm_cuda_ops._C was not built (no _C*.so in {_here})"
    else:
        _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

_HAS_OP = _C is not None
_warned: set[str] = set()
_state = {"use_reference": False}


def has_compiled_op() -> bool:
    """Whether the compiled extension is loaded (else ms_deform_attn uses the reference)."""
    return _HAS_OP


def build_info() -> dict:
    """What was built and loaded: extension, CPU/CUDA kernels, active CPU kernel set, versions."""
    info: dict = {"extension_loaded": _HAS_OP, "torch": torch.__version__}
    if not _HAS_OP:
        info.update(cpu_kernels=False, cuda_kernels=False, error=_LOAD_ERROR)
    else:
        for item in torch.ops.stm_cuda_ops._build_flags().split(";"):
            key, _, val = item.partition("=")
            info[key] = {"1": True, "0": False}.get(val, val)
    info["cuda_available"] = torch.cuda.is_available()
    return info


def _fallback_warning(device_type: str) -> None:
    """One warning per reason (extension missing / no kernel for this device type)."""
    key = "missing" if not _HAS_OP else device_type
    if key in _warned:
        return
    _warned.add(key)
    if not _HAS_OP:
        reason = f"the compiled extension is not available ({_LOAD_ERROR})"
    else:
        reason = f"the extension has no kernel for {device_type!r} tensors (build_info(): {build_info()})"
    warnings.warn(
        f"stm_cuda_ops: {reason}; ms_deform_attn falls back to the (slower, more memory hungry) "
        f"pure-PyTorch reference. Build the op with `{BUILD_COMMAND}`.",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """``with use_reference(): ...`` runs ``ms_deform_attn`` as the pure-PyTorch reference even where the
    compiled kernels exist, without a warning: to export the grid_sample formulation (ONNX GridSample,
    a ``torch.export`` program that runs without this extension), or to test the fallback path."""
    previous = _state["use_reference"]
    _state["use_reference"] = bool(enabled)
    try:
        yield
    finally:
        _state["use_reference"] = previous


class _TracedReference(torch.autograd.Function):
    """The reference as one opaque node for ``torch.jit.trace``, as the compiled op appears there.

    fvcore's FLOP counter traces with torch.jit: it then sees the sampling as one operator whichever
    implementation runs, rather than grid_sampler and the weighting. The backward recomputes the forward
    with autograd.
    """

    @staticmethod
    def forward(ctx, value, sampling_locations, attention_weights, sizes):
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.sizes = sizes
        return grid_sample_msda(value, sizes, sampling_locations, attention_weights)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = grid_sample_msda(inputs[0], ctx.sizes, inputs[1], inputs[2])
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        return (*grads, None)


def _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step,
               static_shapes):
    if torch.jit.is_tracing():
        sizes = level_sizes(spatial_shapes, static_shapes)
        return _TracedReference.apply(value, sampling_locations, attention_weights, sizes)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, im2col_step, static_shapes=static_shapes)


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor, im2col_step: int = 64, *,
                   static_shapes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """Multi-scale deformable attention.

    Args:
        value: (N, S, M, D) float32/float64/float16/bfloat16, values of all levels along S.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l), with sum of H_l * W_l == S.
        level_start_index: (L,) int64, start row of each level (0, H_0*W_0, ...).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y); 0/1 are the outer edges of the
            map (pixel centres at (i + 0.5) / size); samples outside contribute zero.
        attention_weights: (N, Lq, M, L, P), same dtype as value.
        im2col_step: batch partition of the original CUDA implementation; any positive value
            works for any batch size and does not change the result.
        static_shapes: optional spatial_shapes as Python int pairs, for the pure-PyTorch path (it
            then never reads the tensor back from the device); the compiled kernels ignore it.

    Returns:
        (N, Lq, M * D) in value's dtype (float32 under autocast). Differentiable with respect to
        value, sampling_locations and attention_weights. Samples with a NaN or infinite coordinate
        are out of range (zero output and gradient), in the kernels and in the fallback alike.

    Raises:
        TypeError: an input is not a torch.Tensor (e.g. a numpy array), naming the argument.
        RuntimeError: invalid shapes, dtypes, devices or level geometry (named in the message).
    """
    check_tensor_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _state["use_reference"]:
        return _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          im2col_step, static_shapes)
    if not _HAS_OP or value.device.type not in _COMPILED_DEVICES:
        _fallback_warning(value.device.type)
        return _reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          im2col_step, static_shapes)
    return torch.ops.stm_cuda_ops.ms_deform_attn_forward(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        int(im2col_step),
    )


# Devices with a compiled kernel (meta: shape propagation through the fake kernel).
_COMPILED_DEVICES = ("cpu", "meta")

if _HAS_OP:
    if "cuda_kernels=1" in torch.ops.stm_cuda_ops._build_flags():
        _COMPILED_DEVICES = ("cpu", "cuda", "meta")

    def _check_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        # The compiled kernels check everything (values included); this is the subset that can be
        # checked from shapes alone, so that tracing fails early with the same messages.
        for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                        ("sampling_locations", sampling_locations),
                        ("attention_weights", attention_weights)):
            torch._check(
                t.device == value.device,
                lambda name=name, t=t: "ms_deform_attn: all tensors must be on the same device, but "
                f"value is on {value.device} and {name} is on {t.device}",
            )
        torch._check(value.dim() == 4, lambda: "ms_deform_attn: value must be 4-D (N, S, M, D)")
        torch._check(
            sampling_locations.dim() == 6,
            lambda: "ms_deform_attn: sampling_locations must be 6-D (N, Lq, M, L, P, 2)",
        )
        torch._check(
            attention_weights.dim() == 5,
            lambda: "ms_deform_attn: attention_weights must be 5-D (N, Lq, M, L, P)",
        )

    @torch.library.register_fake("stm_cuda_ops::ms_deform_attn_forward")
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                      attention_weights, im2col_step):
        _check_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake("stm_cuda_ops::ms_deform_attn_backward")
    def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, grad_output, im2col_step):
        _check_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def _setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, step = inputs
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        ctx.im2col_step = step

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = (
            ctx.saved_tensors
        )
        grad_value, grad_loc, grad_attn = torch.ops.stm_cuda_ops.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            grad_output, ctx.im2col_step,
        )
        return grad_value, None, None, grad_loc, grad_attn, None

    torch.library.register_autograd(
        "stm_cuda_ops::ms_deform_attn_forward", _backward, setup_context=_setup_context
    )
