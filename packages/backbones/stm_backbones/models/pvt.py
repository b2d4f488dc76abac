"""U-PVT: spatial-reduction attention (SRA) as the spatial token mixer (spec §2.3), plus PVT-v2 (spec §4).

A block on the tokens t of an NCHW map (γ: layer scale; DropPath on both residual branches):

    t = t + γ1·SRA(LN(t))      SRA: queries from every token; keys/values from the map reduced by a
                               stride-sr conv + LayerNorm; softmax(q·kᵀ·d^-½)·v per head, then `proj`
    t = t + γ2·MLP(LN(t))      PVT-v2: fc1 -> depth-wise 3x3 conv on the token grid -> GELU -> fc2

* `PvtBlock` (PVT-v1 style, all `unified_pvt_*` models): a learned absolute position embedding on the first
  block of every stage.

  - classification (`dense=False`): the pos-embed has the nominal stage resolution fixed at construction,
    is added to the input *and stays in the residual*; inputs must give exactly that resolution.
  - dense (`dense=True`, the detection variant of spec §5): the residual is taken *before* the pos-embed,
    which is bilinearly resized (align_corners=True) to the actual map size on every forward.

* `PvtV2Block` (`unified_pvt_v2_*`, `official_pvt_v2_b0`): the same SRA, no pos-embed, and the dwconv MLP.
  Any input size works.

`official_pvt_v2_b0` uses the PVT-v2 macro design: an overlapping 7x7/4 patch-embed stem and 3x3/2
patch-embed downsamplers (keys `downsample_layers.i.proj/norm`) and no conv_head.

The `forward`s below are the plain formulation; with `stm_backbones.fast_paths` on, the blocks run
`stm_backbones.fast.pvt` instead (fused SDPA, the projection accumulating into the residual, the chunked MLP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module, trunc_normal_
from timm.models import generate_default_cfgs
from torch import nn

from .. import fast_paths
from .._builder import build_model, study_cfg
from ..fast import pvt as fast_pvt
from ..geometry import fixed_size_error, pair, stage_resolutions
from ..layers import Mlp, drop_path_or_identity, layer_scale, scale
from ..meta_arch import DEFAULT_NORM
from ..mixer import MixerBlock, per_stage
from ..registry import register_mixer, register_model

SR_RATIOS = (8, 4, 2, 1)


# ------------------------------------------------------------------------------------------ blocks
@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class _SraBlockBase(MixerBlock):
    """Shared construction of the PVT-v1 and PVT-v2 blocks (norms, SRA, γ, DropPath)."""

    def __init__(self, dim: int, drop_path: float, stage: int, layer_scale_init_value: float,
                 num_heads, mlp_ratios, sr_ratios, qkv_bias: bool, pos_embed_size: tuple[int, int] | None = None,
                 mlp_type: type[nn.Module] = Mlp):
        super().__init__()
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_embed_size))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        self.gamma_1 = layer_scale((dim,), layer_scale_init_value)
        self.gamma_2 = layer_scale((dim,), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SpatialReductionAttention(dim, int(per_stage(num_heads, stage)),
                                              sr_ratio=int(per_stage(sr_ratios, stage)), qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = mlp_type(dim, int(dim * per_stage(mlp_ratios, stage)))
        self.drop_path = drop_path_or_identity(drop_path)

    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        """Every stage must be at least as large as its spatial-reduction ratio."""
        sizes = stage_resolutions(height, width)
        if all(h >= sr and w >= sr for (h, w), sr in zip(sizes, SR_RATIOS)):
            return None
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        return (f"a {height}x{width} input gives stage resolutions {listed}, smaller than the spatial-reduction "
                f"ratios {SR_RATIOS} of the stages; use inputs of at least 32x32")


class PvtBlock(_SraBlockBase):
    """PVT-v1 block, NCHW in/out: [pos-embed on block 0] -> SRA on LN(tokens) -> MLP on LN(tokens)."""

    position_tables = ("pos_embed",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if not self.dense and self.pos_embed is not None and tuple(self.pos_embed.shape[-2:]) != (height, width):
            raise ValueError(f"PvtBlock built for a {self.pos_embed.shape[-2]}x{self.pos_embed.shape[-1]} map (fixed "
                             f"position embedding), got {height}x{width}; pass the matching img_size to "
                             "timm.create_model")
        if fast_paths.enabled():
            return fast_pvt.pvt_block_forward(self, x)
        t = _tokens(x)  # (B, H*W, C)
        if self.pos_embed is None:
            u = t
        elif self.dense:  # the residual t is taken before the (resized) position embedding
            u = t + _tokens(self.resized_pos_embed(height, width))
        else:  # classification: the position embedding stays in the residual
            t = u = t + _tokens(self.pos_embed)
        t = t + self.drop_path(scale(self.attn(self.norm1(u), height, width), self.gamma_1))
        t = t + self.drop_path(scale(self.mlp(self.norm2(t)), self.gamma_2))
        return _untokens(t, height, width)

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, depth: int = 0,
                 input_resolution: Sequence[int] = (56, 56), layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: float | Sequence[float] = (8, 8, 4, 4), sr_ratios: int | Sequence[int] = SR_RATIOS,
                 qkv_bias: bool = True, **_: Any):
        # only the first block of a stage has a position embedding (nominal stage resolution)
        super().__init__(dim, drop_path, stage, layer_scale_init_value, num_heads, mlp_ratios, sr_ratios, qkv_bias,
                         pos_embed_size=pair(input_resolution) if depth == 0 else None)
        self.dense = dense
        self.input_resolution = pair(input_resolution)

    def resized_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The position embedding at (height, width): bilinear, align_corners=True (itself at its own size)."""
        if tuple(self.pos_embed.shape[-2:]) == (height, width):
            return self.pos_embed  # bilinear/align_corners=True to the same size is the identity
        return F.interpolate(self.pos_embed, size=(height, width), mode="bilinear", align_corners=True)

    # ---- family policies (stm_backbones.mixer)
    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        too_small = _SraBlockBase.input_size_error(height, width, img_size, dense)
        if dense:
            return too_small  # the pos-embed is resized to any size
        return fixed_size_error(height, width, img_size, "its position embeddings are fixed at construction",
                                "resizes the position embeddings on the fly") or too_small

    @classmethod
    def adapt_checkpoint_tensor(cls, name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """A position embedding of another img_size is resized (bilinear, align_corners=True) to the model's."""
        return resize_pos_embed(value, target) if name == "pos_embed" else value


class PvtV2Block(_SraBlockBase):
    """PVT-v2 block, NCHW in/out: SRA on LN(tokens), then the dwconv MLP on LN(tokens); no pos-embed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_paths.enabled():
            return fast_pvt.pvt_v2_block_forward(self, x)
        height, width = x.shape[-2:]
        t = _tokens(x)
        t = t + self.drop_path(scale(self.attn(self.norm1(t), height, width), self.gamma_1))
        t = t + self.drop_path(scale(self.mlp(self.norm2(t), height, width), self.gamma_2))
        return _untokens(t, height, width)

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 num_heads: int | Sequence[int] = (1, 2, 5, 8), mlp_ratios: float | Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: int | Sequence[int] = SR_RATIOS, qkv_bias: bool = True, **_: Any):
        super().__init__(dim, drop_path, stage, layer_scale_init_value, num_heads, mlp_ratios, sr_ratios, qkv_bias,
                         mlp_type=DWConvMlp)


# ------------------------------------------------------------------------------------------ attention and MLP
class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced by a stride-`sr` conv + LayerNorm.

    Keys `q`, `kv` (first C outputs are k, the next C are v, each head-major), `proj`, and for sr > 1
    `sr` (Conv2d C->C, kernel = stride = sr, with bias) and `norm` (LayerNorm, eps 1e-5).
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, y: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """y: (B, N = H*W, C) normalised tokens; returns (B, N, C)."""
        if fast_paths.enabled():
            return self.proj(fast_pvt.sra_attend(self, y, height, width))
        batch, tokens, channels = y.shape
        q = self.q(y).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        z = self.norm(_tokens(self.sr(_untokens(y, height, width)))) if self.sr_ratio > 1 else y  # reduced map
        kv = self.kv(z).reshape(batch, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)  # each (B, heads, N', d)
        weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # scaled after the product
        return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, channels))


class DWConv(nn.Module):
    """Depth-wise 3x3 conv (with bias) on tokens viewed as their (B, C, H, W) grid; key `dwconv`."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, stride=1, padding=1, groups=dim)

    def forward(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return _tokens(self.dwconv(_untokens(t, height, width)))


class DWConvMlp(nn.Module):
    """PVT-v2 MLP: fc1 -> depth-wise 3x3 conv on the token grid -> GELU -> fc2 (keys fc1, dwconv.dwconv, fc2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(t), height, width)))


# ------------------------------------------------------------------------------------------ tokens and tables
def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), pixels row-major."""
    return x.flatten(2).transpose(1, 2)


def _untokens(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.reshape(t.shape[0], height, width, t.shape[-1]).permute(0, 3, 1, 2)


def resize_pos_embed(embed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A (1, C, h, w) position embedding resized to `target`'s (H, W): bilinear, align_corners=True."""
    if embed.shape == target.shape:
        return embed
    resized = F.interpolate(embed.float(), size=target.shape[-2:], mode="bilinear", align_corners=True)
    return resized.to(embed.dtype)


# ------------------------------------------------------------------------------------------ official PVT-v2 parts
class OverlapPatchEmbed(nn.Module):
    """PVT-v2 patch embedding: strided conv (with bias) + norm on NCHW; keys `proj`, `norm`.

    Stem (`downsample_layers.0`): 7x7, stride 4, pad 3. Downsamplers: 3x3, stride 2, pad 1.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer=DEFAULT_NORM, patch_size: int = 7,
                 stride: int = 4, **_: Any):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = norm_layer(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class OverlapDownsample(OverlapPatchEmbed):
    """The 3x3 stride-2 overlapping patch embedding between stages (`downsample_layers.{1,2,3}`)."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer=DEFAULT_NORM, **kwargs: Any):
        kwargs.pop("patch_size", None)
        kwargs.pop("stride", None)
        super().__init__(in_channels, out_channels, norm_layer=norm_layer, patch_size=3, stride=2, **kwargs)


# ------------------------------------------------------------------------------------------ registered models
PVT_COMMON = dict(num_heads=(1, 2, 5, 8), sr_ratios=SR_RATIOS, qkv_bias=True)
DIMS = (64, 128, 320, 512)
# Declarative size tables: dims, depths, MLP ratios per stage, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 160, 256), depths=(2, 2, 3, 2), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.0),
    "tiny": dict(dims=DIMS, depths=(3, 4, 9, 3), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.1),
    "small": dict(dims=DIMS, depths=(3, 4, 21, 3), mlp_ratios=(8, 8, 4, 4), drop_path_rate=0.3),
    "base": dict(dims=DIMS, depths=(3, 8, 45, 3), mlp_ratios=(4, 4, 4, 4), drop_path_rate=0.5),
}
V2_DEPTHS = {"micro": (2, 2, 3, 2), "tiny": (3, 3, 9, 3), "small": (3, 3, 21, 3), "base": (3, 6, 45, 3)}
V2_SIZES = {size: {**row, "depths": V2_DEPTHS[size]} for size, row in SIZES.items()}
OFFICIAL_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4))

default_cfgs = generate_default_cfgs({
    "official_pvt_v2_b0": study_cfg(None, first_conv="downsample_layers.0.proj"),
})

register_mixer("pvt", PvtBlock, SIZES, block_kwargs=PVT_COMMON, study=True,
               pretrained_cfg=lambda size: dict(study_filename=f"unified_pvt_{size}.pth", fixed_input_size=True))
register_mixer("pvt_v2", PvtV2Block, V2_SIZES, block_kwargs=PVT_COMMON, study=False)


@register_model
def official_pvt_v2_b0(pretrained: bool = False, **kwargs):
    """The original PVT-v2-b0 macro design (overlapping patch embeddings, no conv_head) in MetaArch."""
    table = dict(OFFICIAL_B0)
    mlp_ratios = table.pop("mlp_ratios")
    args = dict(img_size=224, block_type=PvtV2Block, block_kwargs=dict(mlp_ratios=mlp_ratios, **PVT_COMMON),
                stem_type=OverlapPatchEmbed, downsample_type=OverlapDownsample, extra_transform=False, **table)
    return build_model("official_pvt_v2_b0", pretrained, **{**args, **kwargs})
