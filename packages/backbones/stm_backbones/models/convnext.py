"""U-ConvNeXt: a depth-wise 7x7 convolution as the spatial token mixer (spec §2.1).

    mixer:  x = x + drop_path(γ1 · conv1x1(dwconv7x7(conv1x1(LN(x)))))      (NCHW; γ1 stored (1, C, 1, 1))
    MLP:    x = x + drop_path(γ2 · fc2(GELU(fc1(LN(x)))))                    (NHWC tokens; γ2 stored (1, 1, 1, C))

Quirks of the reference that matter for its checkpoints: unlike ConvNeXt, the depth-wise conv sits between
two 1x1 convs (`dw_input_proj`, `dw_out_proj`, with bias); both LayerNorms use eps 1e-6; the two γ are
stored in different layouts. The fast path (`stm_backbones.fast.convnext`) computes the same function
channels-last end to end.
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_module
from torch import nn

from .. import fast_paths
from ..fast import convnext as fast_convnext
from ..layers import LayerNorm2d, drop_path_or_identity, layer_scale, scale
from ..mixer import MixerBlock
from ..registry import register_mixer


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class UnifiedConvNeXtBlock(MixerBlock):
    """NCHW in/out. Mixer: LN2d -> 1x1 conv -> dw 7x7 conv -> 1x1 conv; then a channels-last MLP."""

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
        if fast_paths.enabled():
            return fast_convnext.block_forward(self, x)
        mixed = self.dw_out_proj(self.dwconv(self.dw_input_proj(self.dw_norm(x))))
        x = x + self.drop_path(scale(mixed, self.gamma_1))
        y = x.permute(0, 2, 3, 1)  # the MLP on channels-last tokens
        y = y + self.drop_path(scale(self.pwconv2(self.act(self.pwconv1(self.pw_norm(y)))), self.gamma_2))
        return y.permute(0, 3, 1, 2)


# Declarative size table: dims, depths, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(3, 3, 8, 3), drop_path_rate=0.0),
    "tiny": dict(dims=(96, 192, 384, 768), depths=(2, 2, 9, 2), drop_path_rate=0.1),
    "small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 24, 2), drop_path_rate=0.4),
    "base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 24, 2), drop_path_rate=0.5),
}

register_mixer("convnext", UnifiedConvNeXtBlock, SIZES, block_kwargs=dict(kernel_size=7),
               pretrained_cfg=lambda size: dict(study_filename=f"unified_convnext_{size}.pth"), study=True)
