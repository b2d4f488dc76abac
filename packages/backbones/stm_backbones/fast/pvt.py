"""The fast forward of the PVT blocks (`models/pvt.py` holds the plain formulation).

Same math as the plain forward up to float rounding, faster because:

* the spatial-reduction attention is one fused `F.scaled_dot_product_attention` call on strided views of
  the q / kv projections instead of q·kᵀ, a scale, a softmax and a product (the reference scales q·kᵀ
  after the product; SDPA's scaling is the same up to float rounding), except under bfloat16 autocast;
* the attention's `proj`, γ1, DropPath and the residual are one GEMM or one fused pass
  (`fast.residual.linear_branch`: γ folded into the weight where that is cheaper, the residual as the
  GEMM's accumulator);
* PVT-v1's GELU MLP runs in cache-sized row chunks accumulating into the residual (`fast.mlp.mlp_branch`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fast_paths
from ..layers import Mlp, scale
from .autocast import autocast_enabled
from .mlp import mlp_branch
from .residual import linear_branch


def sra_attend(attn, y: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The attention of a `SpatialReductionAttention` before `proj`: (B, N, C) -> (B, N, C), heads concatenated."""
    batch, tokens, channels = y.shape
    q = attn.q(y).reshape(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    if attn.sr_ratio > 1:
        z = attn.sr(y.reshape(batch, height, width, channels).permute(0, 3, 1, 2))
        z = attn.norm(z.flatten(2).transpose(1, 2))
    else:
        z = y
    kv = attn.kv(z).reshape(batch, -1, 2, attn.num_heads, attn.head_dim)
    k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each (B, heads, N', d)
    if autocast_enabled(y.device.type) and fast_paths.eager_kernels():
        # the reference's formulation: in bfloat16 the CPU flash kernel (its backward above all) is
        # several times slower than two batched GEMMs and a softmax over the 49 keys
        weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(batch, tokens, channels)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out.transpose(1, 2).reshape(batch, tokens, channels)


def _attn_branch(block, residual: torch.Tensor, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """residual + drop_path(γ1·SRA(LN(t))) (γ1 folded into `proj` where cheaper, the residual as the GEMM
    accumulator, γ and DropPath fused otherwise)."""
    attended = sra_attend(block.attn, block.norm1(t), height, width)
    return linear_branch(residual, attended, block.attn.proj.weight, block.attn.proj.bias, block.gamma_1,
                         block.drop_path)


def _mlp_branch(block, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """t + drop_path(γ2·MLP(LN(t))); `t` must be the block's own tensor (the no-grad path updates it)."""
    mlp = block.mlp
    if not isinstance(mlp, Mlp):  # PVT-v2's MLP with a depth-wise conv: the plain branch
        return t + block.drop_path(scale(mlp(block.norm2(t), height, width), block.gamma_2))
    return mlp_branch(t, block.norm2(t), mlp.fc1, mlp.fc2, block.gamma_2, block.drop_path, inplace=True,
                      act=mlp.act)


def _nchw(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view."""
    return t.reshape(t.shape[0], height, width, t.shape[-1]).permute(0, 3, 1, 2)


def pvt_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """`PvtBlock.forward` (after its input-size check); NCHW in/out."""
    height, width = x.shape[-2:]
    t = x.flatten(2).transpose(1, 2)  # a free view of MetaArch's channels_last maps
    if block.dense:
        identity = t  # residual taken before the position embedding
        if block.pos_embed is not None:
            t = t + block.resized_pos_embed(height, width).flatten(2).transpose(1, 2)
        t = _attn_branch(block, identity, t, height, width)
    else:
        if block.pos_embed is not None:
            t = t + block.pos_embed.flatten(2).transpose(1, 2)  # stays in the residual
        t = _attn_branch(block, t, t, height, width)
    return _nchw(_mlp_branch(block, t, height, width), height, width)


def pvt_v2_block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """`PvtV2Block.forward`; NCHW in/out."""
    height, width = x.shape[-2:]
    t = x.flatten(2).transpose(1, 2)
    t = _attn_branch(block, t, t, height, width)
    return _nchw(_mlp_branch(block, t, height, width), height, width)
