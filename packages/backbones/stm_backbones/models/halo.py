"""U-HaloNet: blocked local self-attention with halos as the spatial token mixer (spec §2.2).

    x = x + drop_path(γ1 · HaloAttn(LN(x)));  x = x + drop_path(γ2 · MLP(LN(x)))     (NHWC, LayerNorm eps 1e-5)

The feature map is cut into `bs x bs` query blocks (bs = 7); each block attends to the `win x win` window
(win = bs + 2·halo = 13) centred on it:  softmax(scale·q·kᵀ + rel(q)) · v,  where the relative-position
logits rel(q) = q·height_rel[win-1+ky-qy] + q·width_rel[win-1+kx-qx] come from the *unscaled* query. Key
positions outside the (padded) image are masked by *filling* their logits with -finfo(dtype).max (not by
adding a large negative number). k|v come from one 1x1 conv (per head [k | v] channels), q from a Linear;
neither has a bias.

* classification (`dense=False`): H and W of every stage must be multiples of bs (224-multiples images).
* dense (`dense=True`, the detection variant of spec §5): the normalised map is zero-padded right/bottom
  to multiples of bs *before* the q/kv projections; only the halo border outside the padded map is
  masked; the output is cropped back before `proj`.

The halo mask depends only on the map size: it is built on first use for each (size, device) and kept in
a small cache on the module (never in the state_dict, follows the input's device). The fast path
(`stm_backbones.fast.halo`) computes the same function with a window gather, one additive mask and fused
attention.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .. import fast_paths
from ..fast import halo as fast_halo
from ..geometry import stage_resolutions
from ..layers import Mlp, SizeCache, drop_path_or_identity, layer_scale, scale
from ..mixer import MixerBlock, per_stage
from ..registry import register_mixer

BLOCK_SIZE = 7
HALO_SIZE = 3


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class UnifiedHaloBlock(MixerBlock):
    """NHWC in/out (the stage hooks permute). x + γ1·Halo(LN(x)); x + γ2·MLP(LN(x)); LayerNorm eps 1e-5."""

    position_tables = ("attn.pos_embed.height_rel", "attn.pos_embed.width_rel")

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (3, 6, 12, 24), block_size: int = BLOCK_SIZE,
                 halo_size: int = HALO_SIZE, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 pos_embed_type: str = "query_related", **_: Any):
        super().__init__()
        if pos_embed_type != "query_related":
            raise ValueError(f"only pos_embed_type='query_related' is implemented (used by every model), "
                             f"got {pos_embed_type!r}")
        self.gamma_1 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.gamma_2 = layer_scale((1, 1, 1, dim), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = HaloAttn(dim, per_stage(num_heads, stage), block_size, halo_size, qkv_bias=qkv_bias, dense=dense)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_paths.enabled():
            return fast_halo.block_forward(self, x)
        x = x + self.drop_path(scale(self.attn(self.norm1(x)), self.gamma_1))
        return x + self.drop_path(scale(self.mlp(self.norm2(x)), self.gamma_2))

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

    @classmethod
    def adapt_checkpoint_tensor(cls, name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Relative-position tables of another window size: resized linearly (align_corners=True)."""
        if name.endswith(("height_rel", "width_rel")):
            return resize_relative_table(value, target)
        return value


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
        self._masks = SizeCache()  # halo_mask per (size, device)
        self._additive_masks = SizeCache()  # the fast path's additive form of it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_paths.enabled():
            return fast_halo.attn_forward(self, x)
        batch, height, width, _ = x.shape
        bs, halo, win, heads = self.block_size, self.halo_size, self.win_size, self.num_heads
        d_qk, d_v = self.dim_head_qk, self.dim_head_v
        if self.dense:  # zero-pad right/bottom to multiples of bs before the projections: q = k = v = 0 there
            x = F.pad(x, (0, 0, 0, (-width) % bs, 0, (-height) % bs))
        elif height % bs or width % bs:
            raise ValueError(f"HaloAttn needs H and W multiples of the block size {bs}, got {height}x{width}")
        padded_h, padded_w = x.shape[1], x.shape[2]
        n_h, n_w = padded_h // bs, padded_w // bs
        # queries: (B, heads, nB, bs², d_qk), block by block
        q = self.q(x).reshape(batch, n_h, bs, n_w, bs, heads, d_qk)
        q = q.permute(0, 5, 1, 3, 2, 4, 6).reshape(batch, heads, n_h * n_w, bs * bs, d_qk)
        # keys and values: the win x win window around each block (zeros outside the map), (B, heads, nB, win², ·)
        kv = self.kv(x.permute(0, 3, 1, 2))
        kv = F.pad(kv, (halo, halo, halo, halo)).unfold(2, win, bs).unfold(3, win, bs)
        kv = kv.reshape(batch, heads, d_qk + d_v, n_h * n_w, win * win).permute(0, 1, 3, 4, 2)
        k, v = kv.split([d_qk, d_v], dim=-1)
        # scaled dot-product logits + relative logits of the unscaled query; outside keys filled with -max
        logits = (q * self.scale) @ k.transpose(-1, -2) + self.pos_embed(q)
        mask = self.halo_mask(padded_h, padded_w, x.device)
        out = logits.masked_fill(mask, -torch.finfo(logits.dtype).max).softmax(dim=-1) @ v
        out = out.reshape(batch, heads, n_h, n_w, bs, bs, d_v).permute(0, 2, 4, 3, 5, 1, 6)
        out = fast_paths.reshape_copy(out, (batch, padded_h, padded_w, heads * d_v))[:, :height, :width]
        return self.proj(out)

    def halo_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(1, nB, 1, win²) bool, True for keys outside the map (cached per size and device)."""
        return self._masks.get((height, width, device), lambda: halo_key_mask(
            height, width, self.block_size, self.halo_size, device=device))


class QueryRelatedPosEmbed(nn.Module):
    """Relative-position logits q·height_rel[win-1+ky-qy] + q·width_rel[win-1+kx-qx] (timm's rel_logits_1d).

    `forward` computes them as q @ table.T over all 2·win-1 rows, then gathers (the reference's formulation
    and FLOP count); the fast path uses `fast.halo.position_tables` instead: one batched product per query
    position.
    """

    def __init__(self, block_size: int, win_size: int, dim_head: int):
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        self.height_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * dim_head ** -0.5)
        self.width_rel = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * dim_head ** -0.5)

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


# ---------------------------------------------------------------------------------- helpers
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


def resize_relative_table(table: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A (2·win-1, d) relative-position table brought to `target`'s number of rows by linear interpolation
    (align_corners=True); unchanged when the shapes agree."""
    if table.shape == target.shape:
        return table
    line = table.float().t().unsqueeze(0)  # (1, d, R1)
    line = F.interpolate(line, size=target.shape[0], mode="linear", align_corners=True)
    return line[0].t().to(table.dtype)


# Declarative size table: dims, depths, heads per stage, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(2, 2, 9, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "tiny": dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}

# The study released these as unified_halonet_{size}.pth.
# fixed_input_size: the classifier takes 224·k inputs only (block size 7 at every stage), so generic tools
# (timm's data config, test suites) must feed it the configured size.
register_mixer("halo", UnifiedHaloBlock, SIZES,
               block_kwargs=dict(block_size=BLOCK_SIZE, halo_size=HALO_SIZE, mlp_ratio=4.0,
                                 pos_embed_type="query_related"),
               pretrained_cfg=lambda size: dict(study_filename=f"unified_halonet_{size}.pth", fixed_input_size=True),
               study=True)
