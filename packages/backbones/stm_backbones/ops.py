"""Multi-scale deformable attention (the DCNv3 sampling op, `deformable_op.md`) for the DCNv3 block.

`ms_deform_attn` uses the compiled kernels of `stm_cuda_ops` when that package imports and has its
extension built; otherwise it falls back to `ms_deform_attn_pytorch` (the grid_sample formulation,
`deformable_op.md` §5) after a one-time warning. Either way the op runs in float32 (float64 inputs stay
float64): under autocast its inputs are cast and autocast is disabled around it, as in the reference.

Sampling convention (`deformable_op.md` §2): locations are normalised (x, y) in [0, 1] with pixel centres
at (i + 0.5) / size; bilinear interpolation; everything outside the map counts as 0.

The second half holds the blocks' CPU fast-path helpers (short-row softmax, residual-accumulating
projections with γ / DropPath fused, the chunked GELU MLP); see "fast paths for the blocks" below.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .layers import residual_add, scale

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
    # grid_sample's [-1, 1] frame. NaN/inf locations count as out of range (zero output and gradient), as in
    # the compiled op: NaN -> -3 and a clamp to [-3, 3], which moves no sample that is in range.
    grids = torch.nan_to_num(2 * sampling_locations - 1, nan=-3.0).clamp(-3.0, 3.0)
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
    for name, arg in (("value", value), ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                      ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(arg).__module__}."
                            f"{type(arg).__name__} (convert it with torch.from_numpy(...) or torch.as_tensor(...))")
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


# ================================================================================ fast paths for the blocks
# Helpers for the mixer blocks' hot paths. Each computes the same function as the straightforward
# formulation (up to float rounding) with fewer passes over memory. Under torch.compile / jit tracing they
# use the straightforward formulation, so that Inductor can fuse it and fvcore counts the same operators.

# The GELU MLP runs in row chunks of about MLP_CHUNK_BYTES of hidden activations when its hidden
# activations as one tensor would take at least MLP_CHUNKING_BYTES: glibc's largest mmap threshold, above
# which every fresh allocation is a new mapping that pays page faults (below it freed memory is reused).
# Chunks stay in the core's caches between fc1, GELU and fc2 and are never mmap-sized; below the threshold
# one chunk is as fast (measured) and launches fewer parallel kernels.
MLP_CHUNK_BYTES = 4 << 20
MLP_CHUNKING_BYTES = 32 << 20
_MIN_CHUNK_ROWS = 256


def plain_path() -> bool:
    """Whether the straightforward formulation should be used (torch.compile tracing, jit tracing)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def reshape_copy(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`x.reshape(shape)` for a non-viewable `x` (eager copies it). While torch.export traces, the copy is an
    explicit clone: with a symbolic batch size the fake tensor can pass for contiguous, and the ONNX exporter's
    decompositions then turn the reshape into a view that the real strides cannot take. Same values either way."""
    if torch.compiler.is_exporting():
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(shape)


def _reduced_autocast(device_type: str) -> torch.dtype | None:
    """The lower-precision autocast dtype if autocast is on for `device_type`, else None."""
    if not _autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def fold_layer_scale(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None):
    """(γ·W, γ·b): `gamma * linear(x, W, b)` as one linear (γ per output channel; None means no γ)."""
    if gamma is None:
        return weight, bias
    return gamma[:, None] * weight, (None if bias is None else gamma * bias)


# ------------------------------------------------------------------------------------------ softmax
def _softmax_lastdim_eager(x: torch.Tensor) -> torch.Tensor:
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    y = x - x.amax(-1, keepdim=True)
    y.exp_()
    return y.div_(y.sum(-1, keepdim=True))


class _SoftmaxLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = _softmax_lastdim_eager(x)
        ctx.save_for_backward(y)
        ctx.in_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        gy = grad * y
        return gy.addcmul_(y, gy.sum(-1, keepdim=True), value=-1).to(ctx.in_dtype)  # y·(g − Σ g·y)


def softmax_lastdim(x: torch.Tensor) -> torch.Tensor:
    """softmax(x, -1) for a short last axis (e.g. the 9 DCNv3 sampling points), in float32.

    ATen's softmax kernel is slow for short rows (it vectorises along the row: ~10x slower than this for
    rows of 9); this uses exp(x − max) / sum with whole-tensor kernels and an analytic backward.
    float16/bfloat16 inputs give float32 (what the deformable op consumes); float32/float64 keep their dtype.
    """
    if plain_path():
        return F.softmax(x, -1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SoftmaxLastDim.apply(x)
    return _softmax_lastdim_eager(x)


# ------------------------------------------------------------------------------------------ residual branches
def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity) or (
        isinstance(module, DropPath) and (module.drop_prob == 0.0 or not module.training))


def residual_linear(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """residual + linear(x, weight, bias), with the residual as the GEMM's accumulator (one pass fewer)."""
    if plain_path() or _autocast_enabled(x.device.type) or residual.shape[:-1] != x.shape[:-1]:
        return residual + F.linear(x, weight, bias)
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out.add_(bias) if not out.requires_grad else out + bias
    return out.view(residual.shape)


def _fold_is_cheaper(weight: torch.Tensor, x: torch.Tensor) -> bool:
    # folding γ into W touches in·out weight entries (3 passes with autograd), scaling the output touches
    # rows·out activations: fold when in_features <= rows
    return weight.shape[1] * x.shape[-1] <= x.numel()


def linear_branch(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  gamma: torch.Tensor | None = None, drop_path: nn.Module | None = None) -> torch.Tensor:
    """residual + drop_path(γ·linear(x, weight, bias)): a block's mixer output projection + residual."""
    drop_path = nn.Identity() if drop_path is None else drop_path
    if plain_path():  # (not layers.residual_add: its torch.result_type call breaks Dynamo's graph)
        return residual + drop_path(scale(F.linear(x, weight, bias), gamma))
    if gamma is not None and _fold_is_cheaper(weight, x):
        weight, bias = fold_layer_scale(weight, bias, gamma)
        gamma = None
    if gamma is None and _is_identity(drop_path):
        return residual_linear(residual, x, weight, bias)
    return residual_add(residual, F.linear(x, weight, bias), gamma, drop_path)


def mlp_branch(residual: torch.Tensor, x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear,
               gamma: torch.Tensor | None = None, drop_path: nn.Module | None = None,
               inplace: bool = False, act: nn.Module | None = None) -> torch.Tensor:
    """residual + drop_path(γ·fc2(act(fc1(x)))); `act` defaults to exact GELU. γ is per channel (C,).

    With exact GELU (`nn.GELU()`), the fast path `mlp_gelu`; any other activation module takes the plain
    route. `inplace=True`: `residual` is the caller's own fresh tensor, which the no-grad path may update.
    """
    drop_path = nn.Identity() if drop_path is None else drop_path
    if act is not None and not (type(act) is nn.GELU and act.approximate == "none"):
        return residual_add(residual, fc2(act(fc1(x))), gamma, drop_path)
    if plain_path():
        return residual + drop_path(scale(fc2(F.gelu(fc1(x))), gamma))
    w2, b2 = fc2.weight, fc2.bias
    if gamma is not None and _fold_is_cheaper(w2, x):  # (rows of x = rows of the hidden activations)
        w2, b2 = fold_layer_scale(w2, b2, gamma)
        gamma = None
    if gamma is None and _is_identity(drop_path):
        return mlp_gelu(x, fc1.weight, fc1.bias, w2, b2, residual=residual, inplace=inplace)
    return residual_add(residual, mlp_gelu(x, fc1.weight, fc1.bias, w2, b2), gamma, drop_path)


# ------------------------------------------------------------------------------------------ GELU MLP
def _chunk_rows(hidden: int, itemsize: int) -> int:
    return max(_MIN_CHUNK_ROWS, MLP_CHUNK_BYTES // max(1, hidden * itemsize))


class _ChunkedGeluMlp(torch.autograd.Function):
    """fc2(GELU(fc1(x))) on 2-D x, row chunk by row chunk; saves x and fc1's output chunks only.

    The backward recomputes GELU per chunk and accumulates the weight gradients chunk by chunk, so the
    hidden activations are streamed through memory once forward and once backward. The saved chunks are
    separate allocations (one big buffer would be a fresh mmap, i.e. page faults, on every step).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, step):
        rows = x.shape[0]
        out = x.new_empty(rows, w2.shape[0])
        w1t, w2t = w1.t(), w2.t()
        hidden = []
        for s in range(0, rows, step):
            e = min(s + step, rows)
            hs = torch.addmm(b1, x[s:e], w1t) if b1 is not None else torch.mm(x[s:e], w1t)
            if b2 is not None:
                torch.addmm(b2, F.gelu(hs), w2t, out=out[s:e])
            else:
                torch.mm(F.gelu(hs), w2t, out=out[s:e])
            hidden.append(hs)
        ctx.save_for_backward(x, w1, w2, *hidden)
        ctx.step = step
        ctx.has_bias = (b1 is not None, b2 is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        need_h = need_x or need_w1 or need_b1
        grad = grad.contiguous()
        step = ctx.step
        gx = torch.empty_like(x) if need_x else None
        gw1 = torch.zeros_like(w1) if need_w1 else None
        gb1 = w1.new_zeros(w1.shape[0]) if need_b1 and ctx.has_bias[0] else None
        gw2 = torch.zeros_like(w2) if need_w2 else None
        gb2 = grad.sum(0) if need_b2 and ctx.has_bias[1] else None
        for i, hs in enumerate(hidden):
            s = i * step
            e = s + hs.shape[0]
            gs = grad[s:e]
            if gw2 is not None:
                gw2.addmm_(gs.t(), F.gelu(hs))
            if need_h:
                gh = torch.ops.aten.gelu_backward(torch.mm(gs, w2), hs)
                if gw1 is not None:
                    gw1.addmm_(gh.t(), x[s:e])
                if gb1 is not None:
                    gb1 += gh.sum(0)
                if gx is not None:
                    torch.mm(gh, w1, out=gx[s:e])
        return gx, gw1, gb1, gw2, gb2, None


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, residual: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
    """[residual +] linear(GELU(linear(x, w1, b1)), w2, b2) on channels-last tokens x (..., C); exact GELU.

    Without autograd: GELU in place and fc2 accumulating into the residual (`inplace=True` lets it
    accumulate into `residual` itself, the caller's own fresh tensor), in row chunks when the hidden
    activations are large (MLP_CHUNKING_BYTES). With autograd: `_ChunkedGeluMlp` when they are large,
    else plain autograd. Under autocast the two linears run in the autocast dtype, as `F.linear` would,
    and the residual keeps its dtype.
    """
    shape, hidden = x.shape, w1.shape[0]
    rows = x.numel() // shape[-1] if shape[-1] else 0
    if plain_path() or rows == 0 or (residual is not None and residual.shape[:-1] != shape[:-1]):
        out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        return out if residual is None else residual + out
    low = _reduced_autocast(x.device.type)
    if low is not None:  # the linears in the autocast dtype; the residual stream keeps its own dtype
        with torch.autocast(x.device.type, enabled=False):
            out = mlp_gelu(*[None if t is None else t.to(low) for t in (x, w1, b1, w2, b2)])
        return out if residual is None else residual + out
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w1, b1, w2, b2, residual))
    step = _chunk_rows(hidden, x.element_size())
    chunked = rows * hidden * x.element_size() >= MLP_CHUNKING_BYTES
    if needs_grad:
        if not chunked:
            out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        else:
            x2 = x.reshape(rows, shape[-1]).contiguous()
            out = _ChunkedGeluMlp.apply(x2, w1, b1, w2, b2, step).view(*shape[:-1], w2.shape[0])
        return out if residual is None else residual + out
    if not chunked:
        step = rows
    x2 = x.reshape(rows, shape[-1]).contiguous()
    w1t, w2t = w1.t(), w2.t()
    if residual is None:
        out = x.new_empty(rows, w2.shape[0])
    else:
        res2 = residual.reshape(rows, residual.shape[-1])
        inplace = inplace and res2.is_contiguous() and res2.data_ptr() == residual.data_ptr()
        out = res2 if inplace else torch.empty_like(res2, memory_format=torch.contiguous_format)
    for s in range(0, rows, step):
        e = min(s + step, rows)
        h = torch.addmm(b1, x2[s:e], w1t) if b1 is not None else torch.mm(x2[s:e], w1t)
        torch.ops.aten.gelu_(h)
        chunk = out[s:e]
        if residual is None:
            if b2 is not None:
                torch.addmm(b2, h, w2t, out=chunk)
            else:
                torch.mm(h, w2t, out=chunk)
            continue
        if inplace:
            chunk.addmm_(h, w2t)
        else:
            torch.addmm(res2[s:e], h, w2t, out=chunk)
        if b2 is not None:
            chunk.add_(b2)
    return out.view(*shape[:-1], out.shape[-1])
