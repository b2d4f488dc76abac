"""HaloNet attention's fast path: k/v windows gathered once with a strided-add backward, the relative logits
and the key mask as one additive attention mask, fused attention (the fast path of `HaloAttn` and
`UnifiedHaloBlock` in `stm_backbones.models.halo`).

Replaces the plain formulation's 1x1 conv on an NCHW copy, `F.pad` + `unfold` of the k|v map (whose backward
is a slow scatter on CPU), the relative logits as q @ table.T over all 2·win-1 rows followed by a gather, the
`masked_fill` of outside keys, and the separate softmax and matmuls. Same math up to float rounding:

* q and the k|v projection are Linear layers on the channels-last tokens (the 1x1 conv's weight viewed
  (out, C));
* the k|v windows are gathered once by `halo_windows`, whose backward adds the overlapping window
  gradients back with a few strided additions instead of `unfold`'s scatter;
* the relative logits and the key mask form one additive attention mask: the mask is separable (a key is
  outside iff its row or its column is), so -inf enters through the two small per-axis logit tables; no
  row is ever fully masked, as a query's own block lies inside the map, so -inf gives exactly the zero
  weights of the -finfo.max fill. The relative logits come from `position_tables` as one batched product
  per query position;
* attention then runs as fused `F.scaled_dot_product_attention` without autograd through the mask, and as
  one `baddbmm` (mask + scale·q·kᵀ), softmax and `bmm` with it;
* residual branches fold γ and DropPath into one `addcmul`, the MLP is `fast.mlp.mlp_branch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast_paths
from .mlp import mlp_branch
from .residual import residual_add


# ---------------------------------------------------------------------------------- k/v windows
def _halo_windows_reference(kv: torch.Tensor, block_size: int, halo_size: int,
                            split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, heads, ch) map -> windows (B, heads, nH, nW, win, win, ·) of channels [:split] and [split:]
    (zeros outside the map), each contiguous, via `unfold`."""
    win = block_size + 2 * halo_size
    padded = F.pad(kv, (0, 0, 0, 0, halo_size, halo_size, halo_size, halo_size))
    windows = padded.unfold(1, win, block_size).unfold(2, win, block_size)  # (B, nH, nW, heads, ch, win, win)
    windows = windows.permute(0, 3, 1, 2, 5, 6, 4)
    return windows[..., :split].contiguous(), windows[..., split:].contiguous()


def halo_windows_grad(grads: tuple[torch.Tensor | None, torch.Tensor | None], map_shape: torch.Size,
                      block_size: int, halo_size: int, split: int, functional: bool = False) -> torch.Tensor:
    """Gradient of the (B, H, W, heads, ch) map from the gradients of its k and v windows (either may be
    None): the overlapping window gradients summed block-aligned piece by piece.

    Eager adds the pieces in place into one zero buffer. `functional=True` (used under torch.compile)
    zero-pads each piece to the full block grid and sums: Inductor fuses that into one pass, whereas the
    in-place form becomes a full copy of the buffer per piece.
    """
    bs, halo = block_size, halo_size
    batch, height, width, heads, channels = map_shape
    n_h, n_w, win = height // bs, width // bs, bs + 2 * halo
    pieces = [(i, min(bs, win - i * bs)) for i in range(-(-win // bs))]  # window rows [i·bs, i·bs + len)
    extra = len(pieces) - 1
    reference = next(g for g in grads if g is not None)
    # gradient of the padded map, in blocks: window (i, j) piece (a, b) lands on block (i + a, j + b)
    grid = (batch, n_h + extra, bs, n_w + extra, bs, heads)
    parts = []
    for grad, width_c in zip(grads, (split, channels - split)):
        if grad is None:
            parts.append(reference.new_zeros(*grid, width_c))
            continue
        grad = grad.permute(0, 2, 4, 3, 5, 1, 6)  # (B, nH, win_y, nW, win_x, heads, ·)
        total = None if functional else reference.new_zeros(*grid, width_c)
        for a, rows in pieces:
            for b, cols in pieces:
                piece = grad[:, :, a * bs:a * bs + rows, :, b * bs:b * bs + cols]
                if functional:  # pads from the last dim backwards: (ch, heads, cols, nW, rows, nH)
                    piece = F.pad(piece, (0, 0, 0, 0, 0, bs - cols, b, extra - b, 0, bs - rows, a, extra - a))
                    total = piece if total is None else total + piece
                else:
                    total[:, a:a + n_h, :rows, b:b + n_w, :cols].add_(piece)
        parts.append(total)
    padded = torch.cat(parts, dim=-1) if split < channels else parts[0]
    padded = padded.reshape(batch, (n_h + extra) * bs, (n_w + extra) * bs, heads, channels)
    return padded[:, halo:halo + height, halo:halo + width]


class _HaloWindows(torch.autograd.Function):
    """`_halo_windows_reference` with `halo_windows_grad` as the backward (`unfold`'s backward is a slow
    scatter on CPU)."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, block_size: int, halo_size: int, split: int):
        ctx.block_size, ctx.halo_size, ctx.split, ctx.map_shape = block_size, halo_size, split, kv.shape
        return _halo_windows_reference(kv, block_size, halo_size, split)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        grad = halo_windows_grad(grads, ctx.map_shape, ctx.block_size, ctx.halo_size, ctx.split,
                                 functional=not fast_paths.eager_kernels())
        return grad, None, None, None


def halo_windows(kv: torch.Tensor, block_size: int, halo_size: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, heads, ch) map (H, W multiples of the block size) -> the win x win windows centred on every
    block (zeros outside the map), (B, heads, nH, nW, win, win, ·), of channels [:split] and [split:]."""
    return _HaloWindows.apply(kv, block_size, halo_size, split)


# ---------------------------------------------------------------------------------- additive attention mask
def position_tables(pos_embed: nn.Module) -> torch.Tensor:
    """(bs², d, win²) tables of a `QueryRelatedPosEmbed`: the relative logits of the query at block position p
    are q @ tables[p], i.e. tables[p, :, (ky, kx)] = height_rel[win-1+ky-qy] + width_rel[win-1+kx-qx] for
    p = (qy, qx). One batched product per query position instead of `forward`'s q @ table.T and gathers."""
    bs, win = pos_embed.block_size, pos_embed.win_size
    device = pos_embed.height_rel.device
    index = (torch.arange(win, device=device)[None, :] - torch.arange(bs, device=device)[:, None] + win - 1)
    rows = pos_embed.height_rel[index][:, None, :, None, :]  # (qy, 1, ky, 1, d)
    cols = pos_embed.width_rel[index][None, :, None, :, :]  # (1, qx, 1, kx, d)
    return (rows + cols).view(bs * bs, win * win, -1).transpose(1, 2)


def additive_key_mask(attn: nn.Module, height: int, width: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
    """(nB, win²): `attn.halo_mask` as an additive 0 / -inf mask, cached on `attn` per (size, device, dtype).
    -inf gives outside keys exactly the zero weight of the -finfo.max fill, as no row is fully masked (a
    query's own block is inside the map)."""
    return attn._additive_masks.get((height, width, device, dtype), lambda: torch.zeros(
        (), dtype=dtype, device=device).masked_fill(attn.halo_mask(height, width, device)[0, :, 0], float("-inf")))


# ---------------------------------------------------------------------------------- forwards
def attn_forward(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`HaloAttn.forward` on a channels-last (B, H, W, C) map."""
    batch, height, width, _ = x.shape
    bs, halo, win, heads = attn.block_size, attn.halo_size, attn.win_size, attn.num_heads
    d_qk, d_v = attn.dim_head_qk, attn.dim_head_v
    if attn.dense:
        pad_bottom, pad_right = (-height) % bs, (-width) % bs
        if pad_bottom or pad_right:
            x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))  # before the projections: q = k = v = 0 there
    elif height % bs or width % bs:
        raise ValueError(f"HaloAttn needs H and W multiples of the block size {bs}, got {height}x{width}")
    padded_h, padded_w = x.shape[1], x.shape[2]
    n_h, n_w = padded_h // bs, padded_w // bs

    blocks = n_h * n_w
    q = attn.q(x).view(batch, n_h, bs, n_w, bs, heads, d_qk)
    q = q.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads * blocks, bs * bs, d_qk)

    kv = F.linear(x, attn.kv.weight.view(attn.kv.out_channels, -1), attn.kv.bias)  # the 1x1 conv, channels-last
    k, v = halo_windows(kv.view(batch, padded_h, padded_w, heads, d_qk + d_v), bs, halo, d_qk)
    k, v = k.view(batch, heads * blocks, win * win, d_qk), v.view(batch, heads * blocks, win * win, d_v)

    # relative logits (from the unscaled q) + key mask, as one additive (B, heads·nB, bs², win²) mask:
    # per query position p: key mask + q @ tables[p], batched over p, then viewed query-major
    key_mask = additive_key_mask(attn, padded_h, padded_w, x.device, q.dtype)  # (nB, win²)
    key_mask = key_mask.expand(batch, heads, blocks, win * win).reshape(1, -1, win * win)
    mask = torch.baddbmm(key_mask, q.flatten(0, 1).transpose(0, 1), position_tables(attn.pos_embed))
    mask = mask.transpose(0, 1).unflatten(0, (batch, heads * blocks))

    if torch.is_grad_enabled() and mask.requires_grad:
        # autograd through the mask (fused SDPA gives it no gradient): mask + scale·q·kᵀ in one product
        logits = torch.baddbmm(mask.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                               alpha=attn.scale)
        out = torch.bmm(logits.softmax(dim=-1), v.flatten(0, 1))  # (B·heads·nB, bs², d_v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=attn.scale)

    out = out.reshape(batch, heads, n_h, n_w, bs, bs, d_v).permute(0, 2, 4, 3, 5, 1, 6)
    out = fast_paths.reshape_copy(out, (batch, padded_h, padded_w, heads * d_v))
    if padded_h != height or padded_w != width:
        out = out[:, :height, :width]
    return attn.proj(out)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`UnifiedHaloBlock.forward` (NHWC in/out): γ and DropPath folded into the residual additions."""
    if not x.is_contiguous():  # the stage's first block gets a permuted NCHW map: one copy
        x = x.contiguous()
    x = residual_add(x, block.attn(block.norm1(x)), block.gamma_1, block.drop_path)
    gamma_2 = None if block.gamma_2 is None else block.gamma_2.view(-1)
    # x is this block's own fresh tensor: the no-grad path may accumulate into it
    return mlp_branch(x, block.norm2(x), block.mlp.fc1, block.mlp.fc2, gamma_2, block.drop_path, inplace=True,
                      act=block.mlp.act)
