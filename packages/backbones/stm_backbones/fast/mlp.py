"""The GELU MLP branch `residual + drop_path(γ·fc2(GELU(fc1(x))))` in cache-sized row chunks.

Plain form: fc1 writes the whole (tokens, 4C) hidden tensor, GELU reads and writes it again, fc2 reads it.
Here, without autograd, each row chunk goes through fc1, GELU (in place) and fc2 while it is in the core's
caches, and fc2 accumulates straight into the residual; with autograd, large MLPs use `_ChunkedGeluMlp`,
which saves fc1's output chunks only and recomputes GELU in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast_paths
from ..layers import scale
from .autocast import reduced_autocast_dtype
from .residual import _fold_is_cheaper, _is_identity, fold_layer_scale, residual_add

# The GELU MLP runs in row chunks of about MLP_CHUNK_BYTES of hidden activations when its hidden
# activations as one tensor would take at least MLP_CHUNKING_BYTES: glibc's largest mmap threshold, above
# which every fresh allocation is a new mapping that pays page faults (below it freed memory is reused).
# Chunks stay in the core's caches between fc1, GELU and fc2 and are never mmap-sized; below the threshold
# one chunk is as fast (measured) and launches fewer parallel kernels.
MLP_CHUNK_BYTES = 4 << 20
MLP_CHUNKING_BYTES = 32 << 20
_MIN_CHUNK_ROWS = 256


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
    if not fast_paths.eager_kernels():
        return residual + drop_path(scale(fc2(F.gelu(fc1(x))), gamma))
    w2, b2 = fc2.weight, fc2.bias
    if gamma is not None and _fold_is_cheaper(w2, x):  # (rows of x = rows of the hidden activations)
        w2, b2 = fold_layer_scale(w2, b2, gamma)
        gamma = None
    if gamma is None and _is_identity(drop_path):
        return mlp_gelu(x, fc1.weight, fc1.bias, w2, b2, residual=residual, inplace=inplace)
    return residual_add(residual, mlp_gelu(x, fc1.weight, fc1.bias, w2, b2), gamma, drop_path)


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
    if not fast_paths.eager_kernels() or rows == 0 or (residual is not None and residual.shape[:-1] != shape[:-1]):
        out = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        return out if residual is None else residual + out
    low = reduced_autocast_dtype(x.device.type)
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
