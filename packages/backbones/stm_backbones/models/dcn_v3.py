"""U-InternImage: DCNv3-style deformable sampling as the spatial token mixer (spec §2.5).

    branch  = GELU(LN(dwconv3x3(u)))                         u = LN(x) channels-last, (B, H, W, C)
    offsets = sampling_offsets(branch), logits = attention_weights(branch)       per head, 9 points
    value   = zero-pad(value_proj(u), pad = 1)                                    (B, Hp, Wp, C)
    loc     = ref + (grid + offsets)·scaler / (Wp, Hp)                 normalised, in the padded frame
    attn(u) = output_proj(Σ_p softmax_p(logits) · bilinear(value, loc_p))        (zeros outside)
    block:  y = y + drop_path(γ1·attn(LN(y))),  y = y + drop_path(γ2·MLP(LN(y)))

The sampling is the multi-scale deformable attention op (one level) of `deformable_op.md`
(`stm_backbones.ops.ms_deform_attn`, compiled in `stm_cuda_ops`). Quirks kept from the reference (they
tie checkpoint channels to kernel points):

* kernel point p has base offset (dx, dy) = (p // 3 - 1, p % 3 - 1): the 3x3 grid is enumerated
  column-major (component 0 of the grid is added to x);
* the value is zero-padded *after* value_proj; reference points and offsets are normalised by the
  padded size;
* the per-stage reference points come from the *image* size, `Himg // 2**(i+2)` (the `extra_inputs`
  hook), so inputs must have sides that are multiples of 32.

Blocks take and return `(x NCHW, stage_inputs)` tuples; the classification and dense variants share the
same block. The fast path (`stm_backbones.fast.dcn`) samples the unpadded map with the location transform
folded into one GEMM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .. import fast_paths, ops
from ..fast import dcn as fast_dcn
from ..layers import ChannelsLastLayerNorm, Mlp, SizeCache, drop_path_or_identity, layer_scale, scale
from ..mixer import MixerBlock, per_stage
from ..registry import register_mixer

IM2COL_STEP = 128


class DeformableAttention(nn.Module):
    """The DCNv3 mixer (`MSDeformAttnGrid_softmax` with one level) on channels-last (B, H, W, C) input.

    Keys `dw_conv.0` (depth-wise conv), `dw_conv.1.norm` (LayerNorm eps 1e-5, channels-last),
    `sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`. `grid` is a plain attribute,
    not in the state_dict.
    """

    def __init__(self, dim: int, num_heads: int, points: int = 9, kernel_size: int = 3, deform_padding: bool = True,
                 dilation_rates: Sequence[int] = (1,), offsets_scaler: float = 1.0, im2col_step: int = IM2COL_STEP):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.points, self.levels = points, 1  # one feature level (the value map of this stage)
        self.offsets_scaler = offsets_scaler
        self.im2col_step = im2col_step
        self.pad = int(math.sqrt(points) // 2) if deform_padding else 0
        self.dw_conv = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, stride=1, padding=(kernel_size - 1) // 2, groups=dim),
            ChannelsLastLayerNorm(dim, eps=1e-5),  # NCHW in, NHWC out
            nn.GELU(),
        )
        self.sampling_offsets = nn.Linear(dim, num_heads * self.levels * points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * self.levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.grid = kernel_grid(points, num_heads, tuple(dilation_rates))  # not a buffer: out of the state_dict
        self._grids = SizeCache()  # the non-state kernel grid on each device it is used on
        self._reset_parameters()
        ops.compiled_op_available()  # import stm_cuda_ops now, not inside a traced forward

    def forward(self, u: torch.Tensor, stage_inputs) -> torch.Tensor:
        """u: (B, H, W, C) (the norm1 output); stage_inputs: (reference_points, spatial_shapes, level_start_index, _)."""
        if fast_paths.enabled():
            return fast_dcn.attention_forward(self, u, stage_inputs)
        reference_points, spatial_shapes, level_start_index = stage_inputs[:3]
        batch, height, width, channels = u.shape
        queries = height * width
        heads, levels, points = self.num_heads, self.levels, self.points
        branch = self.dw_conv(u.permute(0, 3, 1, 2)).reshape(batch, queries, channels)
        offsets = self.sampling_offsets(branch).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(branch).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        pad = self.pad
        value = F.pad(self.value_proj(u), (0, 0, pad, pad, pad, pad))  # zeros around the projected values
        padded = (height + 2 * pad, width + 2 * pad)
        value = value.reshape(batch, padded[0] * padded[1], heads, self.head_dim)
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)  # (Wp, Hp) per level
        locations = (reference_points[:, :, None, :, None, :]
                     + (self.grid_on(u.device) + offsets) * self.offsets_scaler
                     / normalizer[None, None, None, :, None, :])
        out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, self.im2col_step,
                                 static_shapes=[padded])
        return self.output_proj(out).view(batch, height, width, channels)

    def grid_on(self, device: torch.device) -> torch.Tensor:
        """The kernel grid (1, 1, heads, 1, P, 2) on `device` (cached)."""
        return self._grids.get((device,), lambda: self.grid.to(device))

    def _reset_parameters(self) -> None:
        # (MetaArch re-initialises every Linear/Conv afterwards, as the reference does.)
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.zeros_(self.sampling_offsets.bias)
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class DCNv3Block(MixerBlock):
    """(x NCHW, stage_inputs) -> (x NCHW, stage_inputs): deformable mixer on LN(x), then an MLP on LN(x)."""

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 num_heads: int | Sequence[int] = (2, 4, 8, 16), deform_points: int = 9, kernel_size: int = 3,
                 deform_padding: bool = True, dilation_rates: Sequence[int] = (1,), offsets_scaler: float = 1.0,
                 mlp_ratio: float = 4.0, **_: Any):
        super().__init__()
        self.gamma1 = layer_scale((dim,), layer_scale_init_value)  # (no underscore in the reference's names)
        self.gamma2 = layer_scale((dim,), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = DeformableAttention(dim, per_stage(num_heads, stage), points=deform_points,
                                        kernel_size=kernel_size, deform_padding=deform_padding,
                                        dilation_rates=dilation_rates, offsets_scaler=offsets_scaler)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, inputs):
        """y + γ1·attn(LN(y)), then y + γ2·MLP(LN(y)) on y = x channels-last."""
        if fast_paths.enabled():
            return fast_dcn.block_forward(self, inputs)
        x, stage_inputs = inputs
        y = x.permute(0, 2, 3, 1)
        y = y + self.drop_path(scale(self.attn(self.norm1(y), stage_inputs), self.gamma1))
        y = y + self.drop_path(scale(self.mlp(self.norm2(y)), self.gamma2))
        return y.permute(0, 3, 1, 2), stage_inputs

    # ---- meta-architecture hooks
    @staticmethod
    def extra_inputs(image: torch.Tensor, deform_points: int = 9, deform_padding: bool = True, depths: int = 4,
                     **_: Any) -> list[tuple]:
        """Per-stage `(reference_points, spatial_shapes, level_start_index, (h, w))` for an image batch.

        h = Himg // 2**(i+2), w likewise; the value map is padded to (Hp, Wp) = (h + 2·pad, w + 2·pad);
        reference_points (1, h·w, 1, 2) float32 hold ((x + pad + 0.5) / Wp, (y + pad + 0.5) / Hp) for the
        row-major query pixels; spatial_shapes = [[Hp, Wp]] and level_start_index = [0] (int64).
        They depend only on the image size: built once per (size, device, settings) and cached (treat them
        as read-only); rebuilt in place while torch.compile traces.
        """
        pad = int(math.sqrt(deform_points) // 2) if deform_padding else 0
        image_h, image_w = (int(n) for n in image.shape[-2:])
        key = (image_h, image_w, pad, depths, image.device, fast_dcn.made_in_inference_mode())
        return list(_EXTRA_INPUTS.get(key,
                                      lambda: _build_extra_inputs(image_h, image_w, pad, depths, image.device)))

    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        if height % 32 == 0 and width % 32 == 0:
            return None
        rounded = "x".join(str(32 * max(1, math.ceil(n / 32))) for n in (height, width))
        return (f"DCNv3 needs input sides that are multiples of 32 (its sampling reference points are computed "
                f"from the image size, Himg // 2**(stage+2)), got {height}x{width}; pad or resize it, e.g. to "
                f"{rounded}")


# ------------------------------------------------------------------------------------------ geometry helpers
def kernel_grid(points: int = 9, num_heads: int = 1, dilation_rates: Sequence[int] = (1,)) -> torch.Tensor:
    """(1, 1, heads, 1, P, 2) float32 base offsets; point p -> (lin[p // k], lin[p % k]), added as (x, y).

    With k = sqrt(P): lin = linspace(((-k) // 2 + 1)·rate, (k // 2)·rate, k); head h uses rate
    dilation_rates[h % len(dilation_rates)]. Built on the CPU (the block moves it to the input's device).
    """
    k = int(math.sqrt(points))
    if k * k != points:
        raise ValueError(f"deform_points must be a square number, got {points}")
    per_head = []
    for head in range(num_heads):
        rate = dilation_rates[head % len(dilation_rates)]
        lin = torch.linspace(((-k) // 2 + 1) * rate, (k // 2) * rate, k, dtype=torch.float32, device="cpu")
        first = lin.repeat_interleave(k)  # lin[p // k]
        second = lin.repeat(k)  # lin[p % k]
        per_head.append(torch.stack([first, second], dim=-1))  # (P, 2)
    return torch.stack(per_head).view(1, 1, num_heads, 1, points, 2)


_EXTRA_INPUTS = SizeCache()


def _build_extra_inputs(image_h: int, image_w: int, pad: int, depths: int, device: torch.device) -> list[tuple]:
    out = []
    for i in range(depths):
        h, w = image_h // 2 ** (i + 2), image_w // 2 ** (i + 2)
        hp, wp = h + 2 * pad, w + 2 * pad
        ys = (torch.arange(h, dtype=torch.float32, device=device) + (pad + 0.5)) / hp
        xs = (torch.arange(w, dtype=torch.float32, device=device) + (pad + 0.5)) / wp
        ref = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(1, h * w, 1, 2)
        shapes = torch.tensor([[hp, wp]], dtype=torch.int64, device=device)
        start = torch.zeros(1, dtype=torch.int64, device=device)
        out.append((ref, shapes, start, (h, w)))
    return out


# ------------------------------------------------------------------------------------------ registered models
# Declarative size table: dims, depths, heads per stage, max stochastic-depth rate.
SIZES = {
    "micro": dict(dims=(32, 64, 128, 256), depths=(2, 2, 9, 2), num_heads=(2, 4, 8, 16), drop_path_rate=0.0),
    "tiny": dict(dims=(64, 128, 256, 512), depths=(4, 4, 18, 4), num_heads=(4, 8, 16, 32), drop_path_rate=0.1),
    "small": dict(dims=(80, 160, 320, 640), depths=(4, 4, 21, 4), num_heads=(5, 10, 20, 40), drop_path_rate=0.3),
    "base": dict(dims=(112, 224, 448, 896), depths=(4, 4, 21, 4), num_heads=(7, 14, 28, 56), drop_path_rate=0.5),
    "large": dict(dims=(160, 320, 640, 1280), depths=(5, 5, 22, 5), num_heads=(10, 20, 40, 80), drop_path_rate=0.5),
}
BLOCK_CONSTANTS = dict(deform_points=9, kernel_size=3, deform_padding=True, dilation_rates=(1,), offsets_scaler=1.0,
                       mlp_ratio=4.0)

register_mixer("dcn_v3", DCNv3Block, SIZES, block_kwargs=BLOCK_CONSTANTS,
               pretrained_cfg=lambda size: dict(study_filename=f"unified_internimage_{size}.pth"), study=True)
