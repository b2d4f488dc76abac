"""U-Swin: shifted-window self-attention as the spatial token mixer (spec §2.4), plus `official_swin_tiny`.

`SwinBlock` on an NCHW map x (γ: layer scale; DropPath on both residual branches):

    y = LN(x), zero-padded right/bottom to multiples of the window ws, rolled by (-s, -s)
    per ws x ws window and head: softmax(q·kᵀ/√d + B + M)·v, then `proj`
        B: learned bias indexed by the relative position of the two tokens (`relative_position_index`)
        M: the shift mask, -100 between tokens that were not neighbours before the roll
    x = x + γ1·(windows put back, rolled by (s, s), cropped)
    x = x + γ2·MLP(LN(x))

Reference quirks that matter:

* the mask value is -100, not -inf; q is scaled before the product q·kᵀ;
* classification (`dense=False`): the window/shift geometry and the shift mask (`attn_mask` buffer) are
  fixed at construction from the nominal stage resolution. When `min(resolution) <= window` (note the
  `<=`), the window shrinks to the resolution and the block does not shift;
* dense (`dense=True`, the detection variant of spec §5): window 7 and shift 3 for odd blocks in every
  stage, no `attn_mask` buffer; inputs of any size are padded after `norm1`, the mask built for the
  padded size;
* the reference cannot run a classifier whose stage resolution is larger than the window and not a
  multiple of it (e.g. `img_size=64`: 16x16 in stage 0). We run such stages the way the dense variant does
  (pad after `norm1`, mask built for the padded size at construction); at the study's 224 nothing is padded.

`forward` below is the plain formulation; with `stm_backbones.fast_paths` on, blocks run
`stm_backbones.fast.swin` instead (token gathers for roll + partition, one cached additive mask, fused SDPA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs
from torch import nn

from .. import fast_paths
from .._builder import build_model, study_cfg
from ..checkpoint import CheckpointMismatchError
from ..fast import swin as fast_swin
from ..fast.windows import window_order
from ..geometry import fixed_size_error, pair
from ..layers import LayerNorm2d, Mlp, SizeCache, drop_path_or_identity, layer_scale, scale
from ..mixer import MixerBlock, per_stage
from ..registry import register_mixer, register_model

SHIFT_MASK_VALUE = -100.0


# ------------------------------------------------------------------------------------------ block
@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class SwinBlock(MixerBlock):
    """NCHW in/out. (Shifted-)window attention on LN2d(x), then an MLP on LN2d(x); both with γ and DropPath."""

    no_weight_decay_params = ("attn.relative_position_bias_table",)
    position_tables = ("attn.relative_position_bias_table",)
    derived_buffers = ("attn.relative_position_index", "attn_mask")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dense and tuple(x.shape[-2:]) != self.input_resolution:
            raise ValueError(f"SwinBlock built for a {self.input_resolution[0]}x{self.input_resolution[1]} map "
                             f"(its shift mask is fixed), got {x.shape[-2]}x{x.shape[-1]}")
        if fast_paths.enabled():
            return fast_swin.block_forward(self, x)
        height, width = x.shape[-2:]
        window, shift = self.window_size, self.shift_size
        y = self.norm1(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = F.pad(y, (0, 0, 0, (-width) % window, 0, (-height) % window))  # zeros right/bottom to window multiples
        padded_h, padded_w = y.shape[1:3]
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))  # cyclic shift (no-op for shift 0)
        windows = self.attn(window_partition(y, window), self.shift_mask(padded_h, padded_w, y.device))
        y = torch.roll(window_reverse(windows, window, padded_h, padded_w), shifts=(shift, shift), dims=(1, 2))
        y = y[:, :height, :width]
        x = x + self.drop_path(scale(y, self.gamma_1).permute(0, 3, 1, 2))
        z = self.mlp(self.norm2(x).permute(0, 2, 3, 1))
        return x + self.drop_path(scale(z, self.gamma_2).permute(0, 3, 1, 2))

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, depth: int = 0,
                 input_resolution: Sequence[int] = (56, 56), layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, **_: Any):
        super().__init__()
        self.dense = dense
        self.input_resolution = pair(input_resolution)
        shift = 0 if depth % 2 == 0 else window_size // 2
        if not dense and min(self.input_resolution) <= window_size:
            # the window covers the whole map: shrink it and do not shift (note the `<=`)
            shift, window_size = 0, max(1, min(self.input_resolution))
        self.window_size, self.shift_size = window_size, shift

        self.gamma_1 = layer_scale((dim,), layer_scale_init_value)
        self.gamma_2 = layer_scale((dim,), layer_scale_init_value)
        if not dense and shift > 0:
            height, width = (math.ceil(n / window_size) * window_size for n in self.input_resolution)
            self.register_buffer("attn_mask", shift_window_mask(height, width, window_size, shift, device="cpu"))
        else:
            self.attn_mask = None
        if not dense:  # the fast path's token gathers (fast/windows.py): non-persistent, never in the state_dict
            height, width = (math.ceil(n / window_size) * window_size for n in self.input_resolution)
            order, inverse = window_order(height, width, window_size, shift, device="cpu")
            self.register_buffer("window_order_index", order, persistent=False)
            self.register_buffer("window_order_inverse", inverse, persistent=False)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = WindowAttention(dim, per_stage(num_heads, stage), window_size, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)
        self._masks = SizeCache()  # dense mode: shift masks by padded size
        self._orders = SizeCache()  # dense mode: the fast path's token gathers by padded size

    def shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """(nW, N, N) shift mask of a padded (height, width) map; None for blocks that do not shift."""
        if self.shift_size == 0:
            return None
        if not self.dense:
            return self.attn_mask
        return self._masks.get((height, width, device), lambda: shift_window_mask(
            height, width, self.window_size, self.shift_size, device=device))

    # ---- family policies (stm_backbones.mixer)
    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        if dense:
            return None  # blocks pad to the window; MetaArch checks the multiple-of-32 rule
        return fixed_size_error(height, width, img_size, "the window masks are fixed at construction",
                                "takes any multiple of 32")

    @classmethod
    def adapt_checkpoint_tensor(cls, name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A relative-position table of another window size is interpolated (bicubic) to the model's."""
        if name == "attn.relative_position_bias_table":
            return resize_relative_position_table(value, target, name)
        return value


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias (timm 0.6 layout)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size, device="cpu"))
        self.qkv = nn.Linear(dim, 3 * num_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None  # the fast path's inference mask, not state

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N): bias[h, p, q] = table[index[p, q], h]."""
        tokens = self.window_size ** 2
        index = self.relative_position_index.to(self.relative_position_bias_table.device)
        bias = self.relative_position_bias_table[index.reshape(-1)].view(tokens, tokens, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) windows; mask: (nW, N, N) added to the logits of every batch element."""
        if fast_paths.enabled():
            return fast_swin.window_attention(self, x, mask)
        windows, tokens, _ = x.shape
        heads = self.num_heads
        q, k, v = self.qkv(x).reshape(windows, tokens, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1) + self.relative_position_bias()  # (B * nW, heads, N, N)
        if mask is not None:  # windows are ordered image-major: the nW masks repeat for every image
            count = mask.shape[0]
            logits = logits.view(windows // count, count, heads, tokens, tokens) + mask.unsqueeze(1)
            logits = logits.view(windows, heads, tokens, tokens)
        out = logits.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(windows, tokens, heads * self.head_dim))


# ------------------------------------------------------------------------------------------ geometry
def relative_position_index(window: int, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """(ws², ws²) int64: index[p, q] = (yp - yq + ws - 1)(2ws - 1) + (xp - xq + ws - 1), tokens row-major."""
    ys = torch.arange(window, device=device).repeat_interleave(window)  # y of token p = p // ws
    xs = torch.arange(window, device=device).repeat(window)  # x of token p = p % ws
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return dy * (2 * window - 1) + dx


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws * ws, C); windows ordered batch, window row, window column."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shift_window_mask(height: int, width: int, window: int, shift: int,
                      device: torch.device | str | None = "cpu") -> torch.Tensor:
    """(nW, ws², ws²) float32 mask of a shifted-window block over a (height, width) map (multiples of ws).

    Rows of the rolled map are labelled by bands: 0 for y < H - ws, 1 for H - ws <= y < H - s, 2 beyond
    (columns likewise); tokens of one window attend to each other only within the same label, other
    pairs get -100.
    """
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_band = (rows >= height - window).long() + (rows >= height - shift).long()
    col_band = (cols >= width - window).long() + (cols >= width - shift).long()
    labels = (3 * row_band[:, None] + col_band[None, :]).view(1, height, width, 1)
    labels = window_partition(labels, window).squeeze(-1)  # (nW, ws²)
    different = labels[:, :, None] != labels[:, None, :]
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return torch.where(different, zero + SHIFT_MASK_VALUE, zero)


def resize_relative_position_table(table: torch.Tensor, target: torch.Tensor, key: str) -> torch.Tensor:
    """A ((2w-1)², heads) table brought to `target`'s window size: bicubic on the (2w-1) x (2w-1) grid of each
    head (identity for the same size)."""
    (len_src, heads_src), (len_dst, heads_dst) = table.shape, target.shape
    if heads_src != heads_dst:
        raise CheckpointMismatchError(f"'{key}': checkpoint has {heads_src} heads, the model {heads_dst}")
    side_src, side_dst = int(math.sqrt(len_src)), int(math.sqrt(len_dst))
    grid = table.float().t().reshape(1, heads_src, side_src, side_src)
    grid = F.interpolate(grid, size=(side_dst, side_dst), mode="bicubic", align_corners=False)
    return grid.reshape(heads_dst, len_dst).t().to(table.dtype)


# ------------------------------------------------------------------------------------------ official Swin parts
@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class SwinPatchEmbed(nn.Module):
    """Stem of `official_swin_tiny`: 4x4 stride-4 conv (with bias) + norm; keys `proj`, `norm`. NCHW.

    As in the reference, the classifier only takes `img_size` inputs (`check_size`); the dense variant
    takes any multiple of 32.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer=LayerNorm2d, img_size=224,
                 patch_size: int = 4, check_size: bool = True, **_: Any):
        super().__init__()
        self.img_size = pair(img_size)
        self.check_size = check_size
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride=patch_size)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.check_size and (height, width) != self.img_size:
            suggestion = height if height == width else (height, width)
            raise ValueError(f"official_swin_tiny is built for {self.img_size[0]}x{self.img_size[1]} inputs, got "
                             f"{height}x{width}; pass img_size={suggestion} to timm.create_model to change it")
        return self.norm(self.proj(x))


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class PatchMerging(nn.Module):
    """Swin downsampling: concat of the 2x2 neighbours (row, col) = (0,0), (1,0), (0,1), (1,1) -> LN(4C, eps
    1e-5) -> Linear(4C, C', no bias). NCHW in/out; keys `norm`, `reduction`."""

    def __init__(self, in_channels: int, out_channels: int, **_: Any):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_channels, eps=1e-5)
        self.reduction = nn.Linear(4 * in_channels, out_channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % 2 or width % 2:
            raise ValueError(f"patch merging needs an even-sized map, got {height}x{width}")
        x = x.permute(0, 2, 3, 1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------ registered models
# Declarative size table: dims, depths, heads per stage, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(2, 2, 9, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0),
    "tiny": dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2),
    "small": dict(dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    "base": dict(dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), drop_path_rate=0.5),
}
BLOCK_KWARGS = dict(window_size=7, mlp_ratio=4.0)
OFFICIAL_TINY = dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)

default_cfgs = generate_default_cfgs({
    # not one of the study's released checkpoints: no file name (study_filename() gives None)
    "official_swin_tiny": study_cfg(None, notes=(), fixed_input_size=True, first_conv="downsample_layers.0.proj"),
})

register_mixer("swin", SwinBlock, SIZES, block_kwargs=BLOCK_KWARGS, study=True,
               pretrained_cfg=lambda size: dict(study_filename=f"unified_swin_{size}.pth", fixed_input_size=True))


@register_model
def official_swin_tiny(pretrained: bool = False, **kwargs):
    """The original Swin-T macro design (patch-embed stem, patch merging, one final norm) in MetaArch."""
    table = dict(OFFICIAL_TINY)
    heads = table.pop("num_heads")
    args = dict(img_size=224, block_type=SwinBlock, block_kwargs=dict(num_heads=heads, **BLOCK_KWARGS),
                stem_type=SwinPatchEmbed, stem_kwargs=dict(check_size=not kwargs.get("dense", False)),
                downsample_type=PatchMerging, extra_transform=False, norm_every_stage=False, **table)
    return build_model("official_swin_tiny", pretrained, **{**args, **kwargs})
