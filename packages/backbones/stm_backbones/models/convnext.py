"""U-ConvNeXt: depth-wise 7x7 conv as the spatial token mixer (spec §2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs
from torch import nn

from .. import ops
from .._builder import build_model, study_cfg
from ..layers import LayerNorm2d, drop_path_or_identity, layer_scale
from ..registry import register_model


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


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class UnifiedConvNeXtBlock(nn.Module):
    """NCHW in/out. Mixer: LN2d -> 1x1 conv -> dw 7x7 conv -> 1x1 conv; then a channels-last MLP.

    Computed channels-last end to end: the block reads its input through a (B, H, W, C) view (free when
    the input is stored channels-last, as every block's output is; one copy otherwise), applies both
    LayerNorms over the contiguous channel axis, runs the 1x1 convs as Linear layers on the tokens
    (same weights, viewed (C, C)), the depth-wise conv on the channels-last map (its weight gradient by
    `depthwise_weight_grad`), and folds γ and DropPath into the residual additions. It returns an NCHW view of channels-last memory. Same math as
    the NCHW formulation up to float rounding.
    """

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 kernel_size: int = 7, mlp_ratio: float = 4.0, **_):
        super().__init__()
        # γ of the mixer branch is stored (1, C, 1, 1) (NCHW), γ of the MLP branch (1, 1, 1, C) (NHWC).
        self.gamma_1 = layer_scale((1, dim, 1, 1), layer_scale_init_value)
        self.gamma_2 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.dw_norm = LayerNorm2d(dim, eps=1e-6)
        self.dw_input_proj = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.dw_out_proj = nn.Conv2d(dim, dim, 1)
        self.pw_norm = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.permute(0, 2, 3, 1)
        if not y.is_contiguous():  # NCHW-contiguous input (the stage's first block): one copy
            y = y.contiguous()
        dim = y.shape[-1]
        norm = self.dw_norm
        h = F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        h = F.linear(h, self.dw_input_proj.weight.view(dim, dim), self.dw_input_proj.bias)
        h = self._depthwise(h.permute(0, 3, 1, 2))  # channels-last in, channels-last out
        h = h.permute(0, 2, 3, 1)
        if not h.is_contiguous():
            h = h.contiguous()
        gamma_1 = None if self.gamma_1 is None else self.gamma_1.view(dim)
        y = ops.linear_branch(y, h, self.dw_out_proj.weight.view(dim, dim), self.dw_out_proj.bias, gamma_1,
                              self.drop_path)
        gamma_2 = None if self.gamma_2 is None else self.gamma_2.view(dim)
        # y is this block's own fresh tensor: the no-grad path may accumulate into it
        y = ops.mlp_branch(y, self.pw_norm(y), self.pwconv1, self.pwconv2, gamma_2, self.drop_path, inplace=True,
                           act=self.act)
        return y.permute(0, 3, 1, 2)

    def _depthwise(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.dwconv
        if (torch.jit.is_tracing() or torch.jit.is_scripting() or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or isinstance(conv.padding, str) or len(set(conv.padding)) != 1 or len(set(conv.kernel_size)) != 1):
            return conv(x)  # traced graphs (fvcore, export) see the plain convolution
        return _DepthwiseConv2d.apply(x, conv.weight, conv.bias, conv.padding[0])


# Declarative size table: dims, depths, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(3, 3, 8, 3), drop_path_rate=0.0),
    "tiny": dict(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2), drop_path_rate=0.1),
    "small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 24, 2), drop_path_rate=0.4),
    "base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 24, 2), drop_path_rate=0.5),
}


def _create(size: str, pretrained: bool, **kwargs):
    args = dict(img_size=224, block_type=UnifiedConvNeXtBlock, block_kwargs=dict(kernel_size=7), **SIZES[size])
    return build_model(f"unified_convnext_{size}", pretrained, **{**args, **kwargs})


default_cfgs = generate_default_cfgs({f"unified_convnext_{s}": study_cfg(f"unified_convnext_{s}.pth") for s in SIZES})


@register_model
def unified_convnext_micro(pretrained: bool = False, **kwargs):
    return _create("micro", pretrained, **kwargs)


@register_model
def unified_convnext_tiny(pretrained: bool = False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def unified_convnext_small(pretrained: bool = False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def unified_convnext_base(pretrained: bool = False, **kwargs):
    return _create("base", pretrained, **kwargs)
