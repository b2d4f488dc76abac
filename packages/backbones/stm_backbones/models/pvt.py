"""U-PVT: spatial-reduction attention (SRA) as the spatial token mixer (spec §2.3), plus PVT-v2 (spec §4).

* `PvtBlock` (PVT-v1 style, all `unified_pvt_*` models): queries from every token, keys/values from the
  map reduced by a stride-`sr` conv (+ LayerNorm); a learned absolute position embedding on the first
  block of every stage.

  - classification (`dense=False`): the pos-embed has the nominal stage resolution fixed at construction,
    is added to the input *and stays in the residual*; inputs must give exactly that resolution.
  - dense (`dense=True`, the detection variant of spec §5): the residual is taken *before* the pos-embed,
    which is bilinearly resized (align_corners=True) to the actual map size on every forward.

* `PvtV2Block` (`unified_pvt_v2_*`, `official_pvt_v2_b0`): the same SRA, no pos-embed, and an MLP with a
  depth-wise 3x3 conv between fc1 and the activation. Any input size works.

`official_pvt_v2_b0` uses the PVT-v2 macro design: an overlapping 7x7/4 patch-embed stem and 3x3/2
patch-embed downsamplers (keys `downsample_layers.i.proj/norm`) and no conv_head.
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

from .. import ops
from .._builder import build_model, study_cfg
from ..layers import drop_path_or_identity, layer_scale, scale
from ..meta_arch import DEFAULT_NORM
from ..registry import register_model

SR_RATIOS = (8, 4, 2, 1)


# ------------------------------------------------------------------------------------------ geometry
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _per_stage(value, stage: int):
    return value if isinstance(value, (int, float)) else value[stage]


def actual_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """Stage map sizes for an input image: the stem divides by 4 and each downsample by 2, rounding up."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    sizes = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def nominal_resolutions(img_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """Stage sizes MetaArch builds the blocks for (and the PVT pos-embed shapes): (img // 4) // 2**i."""
    height, width = _pair(img_size)
    return [((height // 4) // 2**i, (width // 4) // 2**i) for i in range(4)]


def _size_text(size: tuple[int, int]):
    return size[0] if size[0] == size[1] else size


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), pixels row-major."""
    return x.flatten(2).transpose(1, 2)


def _untokens(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return t.reshape(t.shape[0], height, width, t.shape[-1]).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------ attention
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
        return self.proj(self.attend(y, height, width))

    def attend(self, y: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The attention before `proj`: (B, N, C) -> (B, N, C), heads concatenated.

        One fused `scaled_dot_product_attention` call on strided views of the q / kv projections (the
        reference scales q·kᵀ after the product; SDPA's scaling is the same up to float rounding).
        """
        batch, tokens, channels = y.shape
        q = self.q(y).reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            z = self.sr(_untokens(y, height, width))
            z = self.norm(_tokens(z))
        else:
            z = y
        kv = self.kv(z).reshape(batch, -1, 2, self.num_heads, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))  # each (B, heads, N', d)
        if ops._autocast_enabled(y.device.type) and not ops.plain_path():
            # the reference's formulation: in bfloat16 the CPU flash kernel (its backward above all) is
            # several times slower than two batched GEMMs and a softmax over the 49 keys
            attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            return (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, tokens, channels)


class _PvtMlp(nn.Module):
    """fc1 -> GELU -> fc2 on tokens (keys `fc1`, `fc2`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(t)))


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


# ------------------------------------------------------------------------------------------ blocks
@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class _SraBlockBase(nn.Module):
    """Shared construction of the PVT-v1 and PVT-v2 blocks (norms, SRA, γ, DropPath)."""

    mlp_type: type[nn.Module] = _PvtMlp

    def __init__(self, dim: int, drop_path: float, stage: int, layer_scale_init_value: float,
                 num_heads, mlp_ratios, sr_ratios, qkv_bias: bool, pos_embed_size: tuple[int, int] | None = None):
        super().__init__()
        if pos_embed_size is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, dim, *pos_embed_size))
            trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed = None
        self.gamma_1 = layer_scale((dim,), layer_scale_init_value)
        self.gamma_2 = layer_scale((dim,), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = SpatialReductionAttention(dim, int(_per_stage(num_heads, stage)),
                                              sr_ratio=int(_per_stage(sr_ratios, stage)), qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = self.mlp_type(dim, int(dim * _per_stage(mlp_ratios, stage)))
        self.drop_path = drop_path_or_identity(drop_path)

    def _attn_branch(self, residual: torch.Tensor, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """residual + drop_path(γ1·SRA(LN(t))) (`ops.linear_branch`: γ1 folded into `proj` where cheaper,
        the residual as the GEMM accumulator, γ and DropPath fused otherwise)."""
        attended = self.attn.attend(self.norm1(t), height, width)
        return ops.linear_branch(residual, attended, self.attn.proj.weight, self.attn.proj.bias, self.gamma_1,
                                 self.drop_path)

    def _mlp_branch(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """t + drop_path(γ2·MLP(LN(t))); `t` must be the block's own tensor (the no-grad path updates it)."""
        mlp = self.mlp
        if not isinstance(mlp, _PvtMlp):
            return t + self.drop_path(scale(mlp(self.norm2(t), height, width), self.gamma_2))
        return ops.mlp_branch(t, self.norm2(t), mlp.fc1, mlp.fc2, self.gamma_2, self.drop_path, inplace=True,
                              act=mlp.act)

    @staticmethod
    def _too_small(height: int, width: int) -> str | None:
        sizes = actual_resolutions(height, width)
        if all(h >= sr and w >= sr for (h, w), sr in zip(sizes, SR_RATIOS)):
            return None
        listed = ", ".join(f"{h}x{w}" for h, w in sizes)
        return (f"a {height}x{width} input gives stage resolutions {listed}, smaller than the spatial-reduction "
                f"ratios {SR_RATIOS} of the stages; use inputs of at least 32x32")


class PvtBlock(_SraBlockBase):
    """PVT-v1 block, NCHW in/out: [pos-embed on block 0] -> SRA on LN(tokens) -> MLP on LN(tokens)."""

    # checkpoint.py resizes `pos_embed` (bilinear, align_corners=True) when loading into another img_size
    RESIZE_POS_EMBED_ON_LOAD = True

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, depth: int = 0,
                 input_resolution: Sequence[int] = (56, 56), layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (1, 2, 5, 8),
                 mlp_ratios: float | Sequence[float] = (8, 8, 4, 4), sr_ratios: int | Sequence[int] = SR_RATIOS,
                 qkv_bias: bool = True, **_: Any):
        # only the first block of a stage has a position embedding (nominal stage resolution)
        super().__init__(dim, drop_path, stage, layer_scale_init_value, num_heads, mlp_ratios, sr_ratios, qkv_bias,
                         pos_embed_size=_pair(input_resolution) if depth == 0 else None)
        self.dense = dense
        self.input_resolution = _pair(input_resolution)

    # ---- meta-architecture hook
    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        if dense:
            return _SraBlockBase._too_small(height, width)  # the pos-embed is resized to any size
        built = _pair(img_size)
        expected = nominal_resolutions(built)
        if actual_resolutions(height, width) == expected:
            return _SraBlockBase._too_small(height, width)
        message = (f"built for {built[0]}x{built[1]} inputs (its position embeddings have the fixed stage "
                   f"resolutions {', '.join(f'{h}x{w}' for h, w in expected)}), got {height}x{width}")
        if actual_resolutions(*built) != expected:
            return (f"img_size={_size_text(built)} gives position embeddings for stage resolutions "
                    f"{', '.join(f'{h}x{w}' for h, w in expected)} that no input produces (a {height}x{width} input "
                    f"gives {', '.join(f'{h}x{w}' for h, w in actual_resolutions(height, width))}): build it with an "
                    "img_size whose sides are multiples of 32")
        if actual_resolutions(height, width) == nominal_resolutions((height, width)):
            return message + f"; pass img_size={_size_text((height, width))} to timm.create_model to change it"
        rounded = tuple(32 * math.ceil(n / 32) for n in (height, width))
        return (message + f"; resize/pad the input to sides that are multiples of 32 and pass e.g. "
                f"img_size={_size_text(rounded)} to timm.create_model, or use "
                "stm_backbones.create_dense_backbone, which resizes the position embeddings on the fly")

    # ---- forward
    def _resized_pos_embed(self, height: int, width: int) -> torch.Tensor:
        if tuple(self.pos_embed.shape[-2:]) == (height, width):
            return self.pos_embed  # bilinear/align_corners=True to the same size is the identity
        return F.interpolate(self.pos_embed, size=(height, width), mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        t = _tokens(x)  # a free view of MetaArch's channels_last maps
        if self.dense:
            identity = t  # residual taken before the position embedding
            if self.pos_embed is not None:
                t = t + _tokens(self._resized_pos_embed(height, width))
            t = self._attn_branch(identity, t, height, width)
        else:
            if self.pos_embed is not None:
                if tuple(self.pos_embed.shape[-2:]) != (height, width):
                    raise ValueError(
                        f"PvtBlock built for a {self.pos_embed.shape[-2]}x{self.pos_embed.shape[-1]} map (fixed "
                        f"position embedding), got {height}x{width}; pass the matching img_size to "
                        "timm.create_model")
                t = t + _tokens(self.pos_embed)  # stays in the residual
            t = self._attn_branch(t, t, height, width)
        return _untokens(self._mlp_branch(t, height, width), height, width)


class PvtV2Block(_SraBlockBase):
    """PVT-v2 block, NCHW in/out: SRA on LN(tokens), then the dwconv MLP on LN(tokens); no pos-embed."""

    mlp_type = DWConvMlp

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 num_heads: int | Sequence[int] = (1, 2, 5, 8), mlp_ratios: float | Sequence[float] = (8, 8, 4, 4),
                 sr_ratios: int | Sequence[int] = SR_RATIOS, qkv_bias: bool = True, **_: Any):
        super().__init__(dim, drop_path, stage, layer_scale_init_value, num_heads, mlp_ratios, sr_ratios, qkv_bias)

    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        return _SraBlockBase._too_small(height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        t = _tokens(x)
        t = self._attn_branch(t, t, height, width)
        return _untokens(self._mlp_branch(t, height, width), height, width)


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
OFFICIAL_B0 = dict(dims=(32, 64, 160, 256), depths=(2, 2, 2, 2), mlp_ratios=(8, 8, 4, 4))


def _args(block_type, table: dict) -> dict:
    table = dict(table)
    mlp_ratios = table.pop("mlp_ratios")
    return dict(img_size=224, block_type=block_type, block_kwargs=dict(mlp_ratios=mlp_ratios, **PVT_COMMON), **table)


def _create(size: str, pretrained: bool, **kwargs):
    return build_model(f"unified_pvt_{size}", pretrained, **{**_args(PvtBlock, SIZES[size]), **kwargs})


def _create_v2(size: str, pretrained: bool, **kwargs):
    table = {**SIZES[size], "depths": V2_DEPTHS[size]}
    return build_model(f"unified_pvt_v2_{size}", pretrained, **{**_args(PvtV2Block, table), **kwargs})


default_cfgs = generate_default_cfgs({
    **{f"unified_pvt_{s}": study_cfg(f"unified_pvt_{s}.pth", fixed_input_size=True) for s in SIZES},
    **{f"unified_pvt_v2_{s}": study_cfg(None) for s in SIZES},
    "official_pvt_v2_b0": study_cfg(None, first_conv="downsample_layers.0.proj"),
})


@register_model
def unified_pvt_micro(pretrained: bool = False, **kwargs):
    return _create("micro", pretrained, **kwargs)


@register_model
def unified_pvt_tiny(pretrained: bool = False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def unified_pvt_small(pretrained: bool = False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def unified_pvt_base(pretrained: bool = False, **kwargs):
    return _create("base", pretrained, **kwargs)


@register_model
def unified_pvt_v2_micro(pretrained: bool = False, **kwargs):
    return _create_v2("micro", pretrained, **kwargs)


@register_model
def unified_pvt_v2_tiny(pretrained: bool = False, **kwargs):
    return _create_v2("tiny", pretrained, **kwargs)


@register_model
def unified_pvt_v2_small(pretrained: bool = False, **kwargs):
    return _create_v2("small", pretrained, **kwargs)


@register_model
def unified_pvt_v2_base(pretrained: bool = False, **kwargs):
    return _create_v2("base", pretrained, **kwargs)


@register_model
def official_pvt_v2_b0(pretrained: bool = False, **kwargs):
    """The original PVT-v2-b0 macro design (overlapping patch embeddings, no conv_head) in MetaArch."""
    args = dict(_args(PvtV2Block, OFFICIAL_B0), stem_type=OverlapPatchEmbed, downsample_type=OverlapDownsample,
                extra_transform=False)
    return build_model("official_pvt_v2_b0", pretrained, **{**args, **kwargs})
