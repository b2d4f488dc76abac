"""A stride-1 depth-wise convolution whose weight gradient runs at convolution speed (ConvNeXt's 7x7 mixer).

Replaces: `nn.Conv2d(C, C, k, padding=k // 2, groups=C)` under autograd. The forward and the input gradient
are the same ATen kernels; only the weight gradient differs. oneDNN's own depth-wise weight gradient is slow
on CPU (several times the forward and input-gradient time in float32, worse in bfloat16, and it does not scale
with threads); `depthwise_weight_grad` computes it as one depth-wise convolution of the padded input with the
output-gradient maps as kernels, which runs at convolution speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def depthwise_weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int, padding: int) -> torch.Tensor:
    """Weight gradient (C, 1, k, k) of a stride-1 depth-wise conv, as one depth-wise conv of the padded input
    with the B·C output-gradient maps as (large) kernels: dW[c] = Σ_b xpad[b, c] ⋆ grad[b, c].

    oneDNN's own depth-wise weight gradient is slow on CPU (several times the forward and input-gradient
    time in float32, worse in bfloat16, and it does not scale with threads); this runs at convolution speed.
    """
    batch, channels, height, width = x.shape
    out_h, out_w = grad.shape[-2:]
    # .contiguous() after the pad: F.pad keeps a channels-last layout, which a 1x1 map has as well
    padded = F.pad(x, (padding, padding, padding, padding)).contiguous()
    padded = padded.view(1, batch * channels, height + 2 * padding, width + 2 * padding)
    kernels = grad.reshape(batch * channels, 1, out_h, out_w)
    weight_grad = F.conv2d(padded, kernels, groups=batch * channels)  # (1, B·C, k, k)
    total = torch.promote_types(weight_grad.dtype, torch.float32)  # sum the batch in at least float32
    return weight_grad.view(batch, channels, kernel_size, kernel_size).sum(0, dtype=total).unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, padding=padding, groups=C)` (stride 1) with `depthwise_weight_grad` as
    the weight gradient. Under CPU autocast it computes in the autocast dtype, as `F.conv2d` would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if torch.is_autocast_enabled("cpu") and x.is_floating_point():
            dtype = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        with torch.autocast("cpu", enabled=False):
            return F.conv2d(x, weight, bias, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        padding, channels = ctx.padding, x.shape[1]
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = depthwise_weight_grad(x, grad, weight.shape[-1], padding).to(ctx.dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.promote_types(grad.dtype, torch.float32)).to(ctx.dtypes[1])
        return grad_x, grad_w, grad_b, None


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a depth-wise `conv`, through `_DepthwiseConv2d` when it is stride 1, undilated, with one
    numeric padding and a square kernel (other convolutions run as they are)."""
    if (conv.stride != (1, 1) or conv.dilation != (1, 1) or isinstance(conv.padding, str)
            or len(set(conv.padding)) != 1 or len(set(conv.kernel_size)) != 1):
        return conv(x)
    return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, conv.padding[0])
