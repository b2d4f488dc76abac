"""U-HaloNet: blocked local self-attention with halos as the spatial token mixer (spec §2.2).

The feature map is cut into `bs x bs` query blocks (bs = 7); each block attends to the `win x win` window
(win = bs + 2·halo = 13) centred on it, with relative-position logits computed from the unscaled query.
Key positions outside the (padded) image are masked by *filling* their logits with -finfo(dtype).max.

* classification (`dense=False`): H and W of every stage must be multiples of bs (224-multiples images).
* dense (`dense=True`, the detection variant of spec §5): the normalised map is zero-padded right/bottom
  to multiples of bs *before* the q/kv projections; only the halo border outside the padded map is
  masked; the output is cropped back before `proj`.

The halo mask depends only on the map size: it is built on first use for each (size, device) and kept in
a small cache on the module (never in the state_dict, follows the input's device).

Fast path (same math as the straightforward formulation up to float rounding): q and the k|v projection
are Linear layers on the channels-last tokens (the 1x1 conv's weight viewed (out, C)); the k|v windows
are gathered once by `halo_windows`, whose backward adds the overlapping window gradients back with a few
strided additions instead of `unfold`'s scatter; the relative logits and the key mask form one additive
attention mask (the mask is separable: a key is outside iff its row or its column is, so -inf enters
through the two small per-axis logit tables; no row is ever fully masked, as a query's own block lies
inside the map, so -inf gives exactly the zero weights of the -finfo.max fill); attention then runs as
fused `F.scaled_dot_product_attention` without autograd through the mask, and as one `baddbmm` (mask +
scale·q·kᵀ), softmax and `bmm` with it. Residual branches fold γ and DropPath into one `addcmul`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from timm.models import generate_default_cfgs
from torch import nn

from .. import ops
from .._builder import build_model, study_cfg
from ..layers import Mlp, SizeCache, drop_path_or_identity, layer_scale, residual_add
from ..registry import register_model
from .swin import stage_resolutions

BLOCK_SIZE = 7
HALO_SIZE = 3


def make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def halo_key_mask(height: int, width: int, block_size: int, halo_size: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(1, nB, 1, win²) bool, True where a window key lies outside the (height, width) map."""
    win = block_size + 2 * halo_size
    offsets = torch.arange(win, device=device) - halo_size

    def inside(length: int) -> torch.Tensor:  # (n_blocks, win): is block b's key k inside [0, length)?
        starts = torch.arange(length // block_size, device=device) * block_size
        pos = starts[:, None] + offsets[None, :]
        return (pos >= 0) & (pos < length)

    rows, cols = inside(height), inside(width)
    valid = rows[:, None, :, None] & cols[None, :, None, :]  # (nH, nW, win, win)
    return (~valid).reshape(1, -1, 1, win * win)


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
                                 functional=torch.compiler.is_compiling())
        return grad, None, None, None


def halo_windows(kv: torch.Tensor, block_size: int, halo_size: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, heads, ch) map (H, W multiples of the block size) -> the win x win windows centred on every
    block (zeros outside the map), (B, heads, nH, nW, win, win, ·), of channels [:split] and [split:]."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return _halo_windows_reference(kv, block_size, halo_size, split)  # traced graphs see plain aten ops
    return _HaloWindows.apply(kv, block_size, halo_size, split)


class QueryRelatedPosEmbed(nn.Module):
    """Relative-position logits q·height_rel[win-1+ky-qy] + q·width_rel[win-1+kx-qx] (timm's rel_logits_1d).

    `forward` computes them as q @ table.T over all 2·win-1 rows, then gathers (the reference's formulation
    and FLOP count); `HaloAttn` uses `position_tables` instead: one batched product per query position.
    """

    def __init__(self, block_size: int, win_size: int, dim_head: int):
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        self.height_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * dim_head ** -0.5)
        self.width_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * dim_head ** -0.5)

    def position_tables(self) -> torch.Tensor:
        """(bs², d, win²): the relative logits of the query at block position p are q @ tables[p], i.e.
        tables[p, :, (ky, kx)] = height_rel[win-1+ky-qy] + width_rel[win-1+kx-qx] for p = (qy, qx)."""
        bs, win = self.block_size, self.win_size
        device = self.height_rel.device
        index = (torch.arange(win, device=device)[None, :] - torch.arange(bs, device=device)[:, None] + win - 1)
        rows = self.height_rel[index][:, None, :, None, :]  # (qy, 1, ky, 1, d)
        cols = self.width_rel[index][None, :, None, :, :]  # (1, qx, 1, kx, d)
        return (rows + cols).view(bs * bs, win * win, -1).transpose(1, 2)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q: (B, heads, nB, bs², d) unscaled -> (B, heads, nB, bs², win²)."""
        bs, win = self.block_size, self.win_size
        batch, heads, blocks, _, dim = q.shape
        q = q.reshape(batch, heads, blocks, bs, bs, dim)
        # index[query coordinate, key coordinate] into the 2·win-1 table rows
        index = (torch.arange(win, device=q.device)[None, :] - torch.arange(bs, device=q.device)[:, None] + win - 1)
        shape = (batch, heads, blocks, bs, bs, win)
        logits_h = torch.gather(q @ self.height_rel.transpose(0, 1), -1, index[:, None, :].expand(shape))
        logits_w = torch.gather(q @ self.width_rel.transpose(0, 1), -1, index[None, :, :].expand(shape))
        rel = logits_h[..., :, None] + logits_w[..., None, :]  # (.., qy, qx, ky, kx)
        return rel.reshape(batch, heads, blocks, bs * bs, win * win)


class HaloAttn(nn.Module):
    """Halo attention on a channels-last (B, H, W, C) map. Keys `kv` (1x1 conv, per-head [k|v] channels),
    `q` (Linear), `pos_embed.{height,width}_rel`, `proj` (Linear with bias); no q/kv bias."""

    def __init__(self, dim: int, num_heads: int, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
                 qk_ratio: float = 1.0, qkv_bias: bool = False, dense: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.dim_head_qk = make_divisible(dim * qk_ratio, 8) // num_heads
        self.dim_head_v = dim // num_heads
        self.scale = self.dim_head_qk ** -0.5
        self.block_size, self.halo_size = block_size, halo_size
        self.win_size = block_size + 2 * halo_size
        self.dense = dense
        self.kv = nn.Conv2d(dim, num_heads * (self.dim_head_qk + self.dim_head_v), 1, bias=qkv_bias)
        self.q = nn.Linear(dim, num_heads * self.dim_head_qk, bias=qkv_bias)
        self.pos_embed = QueryRelatedPosEmbed(block_size, self.win_size, self.dim_head_qk)
        self.proj = nn.Linear(num_heads * self.dim_head_v, dim)
        self._masks = SizeCache()
        self._additive_masks = SizeCache()

    def halo_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        return self._masks.get((height, width, device), lambda: halo_key_mask(
            height, width, self.block_size, self.halo_size, device=device))

    def additive_key_mask(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(nB, win²): the halo mask as an additive 0 / -inf mask. -inf gives outside keys exactly the zero
        weight of the -finfo.max fill, as no row is fully masked (a query's own block is inside the map)."""
        return self._additive_masks.get((height, width, device, dtype), lambda: torch.zeros(
            (), dtype=dtype, device=device).masked_fill(self.halo_mask(height, width, device)[0, :, 0], float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        bs, halo, win, heads = self.block_size, self.halo_size, self.win_size, self.num_heads
        d_qk, d_v = self.dim_head_qk, self.dim_head_v
        if self.dense:
            pad_bottom, pad_right = (-height) % bs, (-width) % bs
            if pad_bottom or pad_right:
                x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))  # before the projections: q = k = v = 0 there
        elif height % bs or width % bs:
            raise ValueError(f"HaloAttn needs H and W multiples of the block size {bs}, got {height}x{width}")
        padded_h, padded_w = x.shape[1], x.shape[2]
        n_h, n_w = padded_h // bs, padded_w // bs

        blocks = n_h * n_w
        q = self.q(x).view(batch, n_h, bs, n_w, bs, heads, d_qk)
        q = q.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads * blocks, bs * bs, d_qk)

        kv = F.linear(x, self.kv.weight.view(self.kv.out_channels, -1), self.kv.bias)  # the 1x1 conv, channels-last
        k, v = halo_windows(kv.view(batch, padded_h, padded_w, heads, d_qk + d_v), bs, halo, d_qk)
        k, v = k.view(batch, heads * blocks, win * win, d_qk), v.view(batch, heads * blocks, win * win, d_v)

        # relative logits (from the unscaled q) + key mask, as one additive (B, heads·nB, bs², win²) mask
        key_mask = self.additive_key_mask(padded_h, padded_w, x.device, q.dtype)  # (nB, win²)
        if torch.jit.is_tracing() or torch.jit.is_scripting():  # the reference's ops (and fvcore FLOP count)
            rel = self.pos_embed(q.view(batch, heads, blocks, bs * bs, d_qk))
            mask = (rel + key_mask[:, None, :]).view(batch, heads * blocks, bs * bs, win * win)
        else:  # per query position p: key mask + q @ tables[p], batched over p, then viewed query-major
            key_mask = key_mask.expand(batch, heads, blocks, win * win).reshape(1, -1, win * win)
            mask = torch.baddbmm(key_mask, q.flatten(0, 1).transpose(0, 1), self.pos_embed.position_tables())
            mask = mask.transpose(0, 1).unflatten(0, (batch, heads * blocks))

        if torch.is_grad_enabled() and mask.requires_grad and not torch.jit.is_tracing():
            # autograd through the mask (fused SDPA gives it no gradient): mask + scale·q·kᵀ in one product
            attn = torch.baddbmm(mask.flatten(0, 1), q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2),
                                 alpha=self.scale)
            out = torch.bmm(attn.softmax(dim=-1), v.flatten(0, 1))  # (B·heads·nB, bs², d_v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=self.scale)

        out = out.reshape(batch, heads, n_h, n_w, bs, bs, d_v).permute(0, 2, 4, 3, 5, 1, 6)
        out = ops.reshape_copy(out, (batch, padded_h, padded_w, heads * d_v))
        if padded_h != height or padded_w != width:
            out = out[:, :height, :width]
        return self.proj(out)


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class UnifiedHaloBlock(nn.Module):
    """NHWC in/out (the stage hooks permute). x + γ1·Halo(LN(x)); x + γ2·MLP(LN(x)); LayerNorm eps 1e-5."""

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (3, 6, 12, 24), block_size: int = BLOCK_SIZE,
                 halo_size: int = HALO_SIZE, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 pos_embed_type: str = "query_related", **_: Any):
        super().__init__()
        if pos_embed_type != "query_related":
            raise ValueError(f"only pos_embed_type='query_related' is implemented (used by every model), "
                             f"got {pos_embed_type!r}")
        heads = num_heads if isinstance(num_heads, int) else num_heads[stage]
        self.gamma_1 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.gamma_2 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = HaloAttn(dim, heads, block_size, halo_size, qkv_bias=qkv_bias, dense=dense)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

    @staticmethod
    def pre_stage_transform(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)

    @staticmethod
    def post_stage_transform(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)

    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        if dense:
            return None  # blocks pad to the block size; MetaArch checks the multiple-of-32 rule
        sizes = stage_resolutions(height, width)
        if all(h % BLOCK_SIZE == 0 and w % BLOCK_SIZE == 0 for h, w in sizes):
            return None
        unit = 32 * BLOCK_SIZE
        suggestion = "x".join(str(unit * max(1, math.ceil(n / unit))) for n in (height, width))
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        return (f"every stage resolution must be a multiple of the block size {BLOCK_SIZE}, i.e. image sides "
                f"{unit}·k (or up to 3 pixels less); a {height}x{width} input gives stage resolutions {listed}. "
                f"Resize or pad it (e.g. to {suggestion}), or use stm_backbones.create_dense_backbone, which pads "
                "inside the blocks")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():  # the stage's first block gets a permuted NCHW map: one copy
            x = x.contiguous()
        x = residual_add(x, self.attn(self.norm1(x)), self.gamma_1, self.drop_path)
        gamma_2 = None if self.gamma_2 is None else self.gamma_2.view(-1)
        # x is this block's own fresh tensor: the no-grad path may accumulate into it
        return ops.mlp_branch(x, self.norm2(x), self.mlp.fc1, self.mlp.fc2, gamma_2, self.drop_path, inplace=True,
                              act=self.mlp.act)


# Declarative size table: dims, depths, heads per stage, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(2, 2, 9, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "tiny": dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}


def _create(size: str, pretrained: bool, **kwargs):
    table = dict(SIZES[size])
    heads = table.pop("num_heads")
    block_kwargs = dict(num_heads=heads, block_size=BLOCK_SIZE, halo_size=HALO_SIZE, mlp_ratio=4.0,
                        pos_embed_type="query_related")
    args = dict(img_size=224, block_type=UnifiedHaloBlock, block_kwargs=block_kwargs, **table)
    return build_model(f"unified_halo_{size}", pretrained, **{**args, **kwargs})


# The study released these as unified_halonet_{size}.pth.
# fixed_input_size: the classifier takes 224·k inputs only (block size 7 at every stage), so generic tools
# (timm's data config, test suites) must feed it the configured size.
default_cfgs = generate_default_cfgs({f"unified_halo_{s}": study_cfg(f"unified_halonet_{s}.pth", fixed_input_size=True)
                                     for s in SIZES})


@register_model
def unified_halo_micro(pretrained: bool = False, **kwargs):
    return _create("micro", pretrained, **kwargs)


@register_model
def unified_halo_tiny(pretrained: bool = False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def unified_halo_small(pretrained: bool = False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def unified_halo_base(pretrained: bool = False, **kwargs):
    return _create("base", pretrained, **kwargs)
