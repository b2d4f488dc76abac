"""The fast forward of Swin's block and window attention (`models/swin.py` holds the plain formulation).

Same math as the plain forward up to float rounding, faster on CPU because:

* the block works on a channels-last (B, H, W, C) view of its NCHW input and returns an NCHW view of
  channels-last memory (no layout copies between blocks, LayerNorm straight on the last axis);
* the cyclic shift and the window partition are one token gather, their inverses another
  (`fast.windows`);
* the relative-position bias and the shift mask are added to the logits as one precomputed additive mask;
  without autograd through that mask (inference) attention runs as fused `F.scaled_dot_product_attention`,
  and the mask, which depends only on the table, is cached; with autograd the softmax flushes the
  denormal weights of masked keys (`fast.softmax.softmax_flush_denormals`);
* the residual branches are fused (`fast.residual.residual_add`, the chunked GELU MLP of `fast.mlp`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fast_paths
from .mlp import mlp_branch
from .residual import residual_add
from .softmax import softmax_flush_denormals
from .windows import attention_bias, inference_mask, permute_tokens, window_order


def window_attention(attn, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """`WindowAttention.forward`: x (B * nW, N, C) windows; mask (nW, N, N) added to the logits of every batch
    element."""
    windows, tokens, _ = x.shape
    heads, dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(windows, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, d)
    if torch.is_grad_enabled() and attn.relative_position_bias_table.requires_grad:
        # autograd through the bias: fused SDPA gives no gradient for its mask, so spell it out
        bias = attention_bias(attn, mask)
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # the scale is applied to q before the product
        count = bias.shape[0]
        logits = (logits.view(windows // count, count, heads, tokens, tokens) + bias).view(
            windows, heads, tokens, tokens)
        out = softmax_flush_denormals(logits, -1) @ v
    else:
        attn_mask = inference_mask(attn, mask, windows, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=attn.scale)
    out = fast_paths.reshape_copy(out.transpose(1, 2), (windows, tokens, heads * dim))
    return attn.proj(out)


def _window_order(block, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not block.dense:
        return block.window_order_index, block.window_order_inverse
    return block._orders.get((height, width, device), lambda: window_order(
        height, width, block.window_size, block.shift_size, device=device))


def shifted_window_attention(block, y: torch.Tensor) -> torch.Tensor:
    """Shifted-window attention on a channels-last (B, H, W, C) map (already normalised)."""
    batch, height, width, channels = y.shape
    window = block.window_size
    pad_bottom, pad_right = (-height) % window, (-width) % window
    if pad_bottom or pad_right:
        y = F.pad(y, (0, 0, 0, pad_right, 0, pad_bottom))
    padded_h, padded_w = height + pad_bottom, width + pad_right
    order, inverse = _window_order(block, padded_h, padded_w, y.device)
    # roll by -shift + window_partition as one gather; window_reverse + roll back as the inverse one
    windows = permute_tokens(y.reshape(batch, padded_h * padded_w, channels), order, inverse)
    windows = window_attention(block.attn, windows.view(-1, window * window, channels),
                               block.shift_mask(padded_h, padded_w, y.device))
    y = permute_tokens(windows.view(batch, padded_h * padded_w, -1), inverse, order)
    y = y.view(batch, padded_h, padded_w, -1)
    if pad_bottom or pad_right:
        y = y[:, :height, :width]
    return y


def block_forward(block, x: torch.Tensor) -> torch.Tensor:
    """`SwinBlock.forward` (after its input-size check): NCHW in, NCHW view of channels-last memory out."""
    y = x.permute(0, 2, 3, 1)  # channels-last view; free for the output of a previous block
    if not y.is_contiguous():
        y = y.contiguous()
    norm1, norm2 = block.norm1, block.norm2
    h = shifted_window_attention(block, F.layer_norm(y, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps))
    y = residual_add(y, h, block.gamma_1, block.drop_path)
    h = F.layer_norm(y, norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps)
    # y is this block's own fresh tensor: the no-grad path may accumulate into it
    y = mlp_branch(y, h, block.mlp.fc1, block.mlp.fc2, block.gamma_2, block.drop_path, inplace=True,
                   act=block.mlp.act)
    return y.permute(0, 3, 1, 2)
