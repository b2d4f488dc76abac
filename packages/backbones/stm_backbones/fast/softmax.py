"""Softmax kernels for short rows and for masked attention logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fast_paths


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
    if not fast_paths.eager_kernels():
        return F.softmax(x, -1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if torch.is_grad_enabled() and x.requires_grad:
        return _SoftmaxLastDim.apply(x)
    return _softmax_lastdim_eager(x)


class _SoftmaxFlushDenormals(torch.autograd.Function):
    """softmax(x) with outputs below finfo.tiny (denormals) set to 0, and the matching softmax backward.

    A key masked with -100 gets a weight of about e^-100 ≈ 4e-44: a float32 *denormal*, on which the CPU's
    matrix products (attn @ v and the backward products) run an order of magnitude slower. Zeroing it
    changes each output by less than 1e-37 of the values' scale (no effect in float64: e^-100 is normal).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, dim: int) -> torch.Tensor:
        probs = torch.softmax(logits, dim)
        F.threshold_(probs, torch.finfo(probs.dtype).tiny, 0.0)
        ctx.save_for_backward(probs)
        ctx.dim = dim
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, probs, ctx.dim, probs.dtype), None


def softmax_flush_denormals(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(logits, dim) for attention logits masked with large negative values (Swin's shift masks), with
    the denormal weights of masked keys flushed to 0 (`_SoftmaxFlushDenormals`); the plain softmax while
    TorchScript traces."""
    if fast_paths.is_tracing():
        return logits.softmax(dim)
    return _SoftmaxFlushDenormals.apply(logits, dim)
