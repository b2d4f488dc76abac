"""The ConvNeXt block computed channels-last end to end (the fast path of `UnifiedConvNeXtBlock`).

Replaces the block's NCHW formulation (LN2d -> 1x1 conv -> dw conv -> 1x1 conv, γ, DropPath; then the
channels-last MLP), which permutes the map between layouts around every layer and pays separate passes for
γ, DropPath and the residual additions. Here the block reads its input through a (B, H, W, C) view (free
when the input is stored channels-last, as every block's output is; one copy otherwise), applies both
LayerNorms over the contiguous channel axis, runs the 1x1 convs as Linear layers on the tokens (same
weights, viewed (C, C)), the depth-wise conv on the channels-last map (its weight gradient by
`fast.depthwise.depthwise_weight_grad`), and folds γ and DropPath into the residual additions
(`fast.residual.linear_branch`, `fast.mlp.mlp_branch`). It returns an NCHW view of channels-last memory.
Same math as the NCHW formulation up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .depthwise import depthwise_conv
from .mlp import mlp_branch
from .residual import linear_branch


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`UnifiedConvNeXtBlock.forward` (NCHW in, NCHW view of channels-last memory out), channels-last inside."""
    y = x.permute(0, 2, 3, 1)
    if not y.is_contiguous():  # NCHW-contiguous input (the stage's first block): one copy
        y = y.contiguous()
    dim = y.shape[-1]
    norm = block.dw_norm
    h = F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    h = F.linear(h, block.dw_input_proj.weight.view(dim, dim), block.dw_input_proj.bias)
    h = depthwise_conv(block.dwconv, h.permute(0, 3, 1, 2))  # channels-last in, channels-last out
    h = h.permute(0, 2, 3, 1)
    if not h.is_contiguous():
        h = h.contiguous()
    gamma_1 = None if block.gamma_1 is None else block.gamma_1.view(dim)
    y = linear_branch(y, h, block.dw_out_proj.weight.view(dim, dim), block.dw_out_proj.bias, gamma_1,
                      block.drop_path)
    gamma_2 = None if block.gamma_2 is None else block.gamma_2.view(dim)
    # y is this block's own fresh tensor: the no-grad path may accumulate into it
    y = mlp_branch(y, block.pw_norm(y), block.pwconv1, block.pwconv2, gamma_2, block.drop_path, inplace=True,
                   act=block.act)
    return y.permute(0, 3, 1, 2)
