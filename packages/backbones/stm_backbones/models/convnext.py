"""U-ConvNeXt: depth-wise 7x7 conv as the spatial token mixer (spec §2.1)."""

from __future__ import annotations

import torch
from timm.models import generate_default_cfgs
from torch import nn

from .._builder import build_model, study_cfg
from ..layers import LayerNorm2d, drop_path_or_identity, layer_scale, scale
from ..registry import register_model


class UnifiedConvNeXtBlock(nn.Module):
    """NCHW in/out. Mixer: LN2d -> 1x1 conv -> dw 7x7 conv -> 1x1 conv; then a channels-last MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 kernel_size: int = 7, mlp_ratio: float = 4.0, **_):
        super().__init__()
        # γ of the mixer branch is applied in NCHW, γ of the MLP branch in NHWC.
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
        mixed = self.dw_out_proj(self.dwconv(self.dw_input_proj(self.dw_norm(x))))
        x = x + self.drop_path(scale(mixed, self.gamma_1))
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop_path(scale(self.pwconv2(self.act(self.pwconv1(self.pw_norm(y)))), self.gamma_2))
        return y.permute(0, 3, 1, 2)


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
