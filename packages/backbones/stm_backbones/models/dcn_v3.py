"""U-InternImage: DCNv3-style deformable sampling as the spatial token mixer (spec §2.5).

Each query pixel gathers, per head, 9 bilinear samples of the projected value map around itself (a 3x3
kernel whose points are shifted by learned offsets) and mixes them with softmax weights; offsets and
weights come from a depth-wise 3x3 conv branch. The sampling itself is the multi-scale deformable
attention op (one level) of `deformable_op.md`, see `stm_backbones.ops`.

Quirks kept from the reference (they tie checkpoint channels to kernel points):

* Kernel point p has base offset (dx, dy) = (p // 3 - 1, p % 3 - 1): the 3x3 grid is enumerated
  column-major (component 0 of the grid is added to x).
* The value comes from the norm1 output and is zero-padded by 1 pixel *after* value_proj; reference
  points and offsets are normalised by the padded size.
* The per-stage reference points come from the *image* size, `Himg // 2**(i+2)` (the `extra_inputs`
  hook), so inputs must have sides that are multiples of 32.

Blocks take and return `(x NCHW, stage_inputs)` tuples; the classification and dense variants share
the same block.
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
from ..layers import ChannelsLastLayerNorm, Mlp, SizeCache, drop_path_or_identity, layer_scale
from ..registry import register_model

IM2COL_STEP = 128


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


_LEVEL_TENSORS = SizeCache()
_EXTRA_INPUTS = SizeCache()


def _made_in_inference_mode() -> bool:
    """Part of the cache keys: tensors made under torch.inference_mode() must not reach autograd later.
    Dynamo cannot trace the query (a graph break); compiled code never runs in inference mode here."""
    return False if torch.compiler.is_compiling() else torch.is_inference_mode_enabled()


def _level_tensors(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [[height, width]] and level_start_index [0] (int64) of a one-level map."""
    return _LEVEL_TENSORS.get((height, width, device, _made_in_inference_mode()), lambda: (
        torch.tensor([[height, width]], dtype=torch.int64, device=device),
        torch.zeros(1, dtype=torch.int64, device=device)))


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

    def forward(self, u: torch.Tensor, stage_inputs) -> torch.Tensor:
        """u: (B, H, W, C) (the norm1 output); stage_inputs: (reference_points, spatial_shapes, level_start_index, _)."""
        return self.output_proj(self.sample(u, stage_inputs)).view(u.shape)

    def sample(self, u: torch.Tensor, stage_inputs) -> torch.Tensor:
        """The deformable sampling before `output_proj`: (B, H, W, C) -> (B, H·W, C).

        Computes what the reference computes (value zero-padded by `pad` after value_proj, locations
        `ref + (grid + offsets)·scaler / (Wp, Hp)` in the padded frame, softmax weights) in a cheaper form:

        * no padding: sampling the padded map at padded pixel X equals sampling the unpadded map at X − pad
          (bilinear, zeros outside, in both the compiled op and grid_sample), so the locations are
          expressed in the unpadded frame and the value map is used as it is;
        * the affine location transform is folded into the offsets projection: one GEMM with weight
          W·scaler/(W, H) and a per-(query, head, point) bias table replace linear + 4 element-wise passes;
        * offsets and attention logits come from one GEMM; the softmax over the 9 points uses
          `ops.softmax_lastdim` (ATen's kernel is slow for such short rows).
        """
        reference_points = stage_inputs[0]
        batch, height, width, channels = u.shape
        queries = height * width
        heads, points, pad = self.num_heads, self.points, self.pad
        rows = heads * points  # (head, point) pairs, levels == 1
        low = ops._reduced_autocast(u.device.type)
        if low is not None and not ops.plain_path():
            u = u.to(low)  # what autocast gives the conv and value_proj, cast once instead of twice

        # offsets and weights from the depth-wise conv branch: conv on the channels-last view, LN, GELU
        conv, norm = self.dw_conv[0], self.dw_conv[1]
        branch = norm(conv(u.permute(0, 3, 1, 2)))
        if torch.is_grad_enabled() and branch.requires_grad or ops.plain_path():
            branch = F.gelu(branch)
        else:
            branch = torch.ops.aten.gelu_(branch)
        branch = branch.reshape(batch * queries, channels)

        # location = base(query) + const(head, point) + branch @ w_loc.T, in the unpadded normalised frame
        weight = self.sampling_offsets.weight
        factor = torch.tensor([self.offsets_scaler / width, self.offsets_scaler / height], dtype=weight.dtype,
                              device=u.device)
        w_loc = (weight.view(rows, 2, channels) * factor[:, None]).view(2 * rows, channels)
        grid = self._grids.get((u.device,), lambda: self.grid.to(u.device)).view(rows, 2)
        const = (grid + self.sampling_offsets.bias.view(rows, 2)) * factor  # (rows, 2)
        ref_dtype = torch.promote_types(reference_points.dtype, weight.dtype)
        padded = torch.tensor([width + 2 * pad, height + 2 * pad], dtype=ref_dtype, device=u.device)
        base = (reference_points.reshape(queries, 2).to(ref_dtype) * padded - pad) / (padded - 2 * pad)  # (x+.5)/W
        table = (base[:, None, :] + const[None]).reshape(queries, 2 * rows)

        projected = torch.mm(branch, torch.cat([w_loc, self.attention_weights.weight]).t())
        loc, logits = projected.split([2 * rows, rows], dim=-1)
        locations = (loc.view(batch, queries, 2 * rows) + table).view(batch, queries, heads, 1, points, 2)
        weights = ops.softmax_lastdim((logits + self.attention_weights.bias).view(batch, queries, heads, points))
        weights = weights.view(batch, queries, heads, 1, points)

        value = self.value_proj(u).reshape(batch, queries, heads, self.head_dim)
        spatial_shapes, level_start_index = _level_tensors(height, width, u.device)
        return ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, self.im2col_step,
                                  static_shapes=[(height, width)])


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


@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class DCNv3Block(nn.Module):
    """(x NCHW, stage_inputs) -> (x NCHW, stage_inputs): deformable mixer on LN(x), then an MLP on LN(x)."""

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, layer_scale_init_value: float = 1e-6,
                 num_heads: int | Sequence[int] = (2, 4, 8, 16), deform_points: int = 9, kernel_size: int = 3,
                 deform_padding: bool = True, dilation_rates: Sequence[int] = (1,), offsets_scaler: float = 1.0,
                 mlp_ratio: float = 4.0, **_: Any):
        super().__init__()
        heads = num_heads if isinstance(num_heads, int) else num_heads[stage]
        self.gamma1 = layer_scale((dim,), layer_scale_init_value)  # (no underscore in the reference's names)
        self.gamma2 = layer_scale((dim,), layer_scale_init_value)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = DeformableAttention(dim, heads, points=deform_points, kernel_size=kernel_size,
                                        deform_padding=deform_padding, dilation_rates=dilation_rates,
                                        offsets_scaler=offsets_scaler)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)

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
        key = (image_h, image_w, pad, depths, image.device, _made_in_inference_mode())
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

    # ---- forward
    def forward(self, inputs):
        """y + γ1·attn(LN(y)), then y + γ2·MLP(LN(y)) on y = x channels-last.

        Fast path (the same function up to float rounding): `ops.linear_branch` / `ops.mlp_branch` fold γ
        into output_proj / fc2 where that is cheaper, use the residual as the GEMM accumulator, fuse γ and
        DropPath into one pass otherwise, and run the MLP in cache-sized row chunks. MetaArch's maps are
        channels_last in memory, so the permutes here are free views.
        """
        x, stage_inputs = inputs
        y = x.permute(0, 2, 3, 1)
        attn, mlp = self.attn, self.mlp
        sampled = attn.sample(self.norm1(y), stage_inputs).view(y.shape)
        y = ops.linear_branch(y, sampled, attn.output_proj.weight, attn.output_proj.bias, self.gamma1,
                              self.drop_path)
        # y is this block's own fresh tensor: the no-grad path may accumulate into it
        y = ops.mlp_branch(y, self.norm2(y), mlp.fc1, mlp.fc2, self.gamma2, self.drop_path, inplace=True,
                           act=mlp.act)
        return y.permute(0, 3, 1, 2), stage_inputs


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


def _create(size: str, pretrained: bool, **kwargs):
    table = dict(SIZES[size])
    heads = table.pop("num_heads")
    args = dict(img_size=224, block_type=DCNv3Block, block_kwargs=dict(num_heads=heads, **BLOCK_CONSTANTS), **table)
    return build_model(f"unified_dcn_v3_{size}", pretrained, **{**args, **kwargs})


default_cfgs = generate_default_cfgs({f"unified_dcn_v3_{s}": study_cfg(f"unified_internimage_{s}.pth") for s in SIZES})


@register_model
def unified_dcn_v3_micro(pretrained: bool = False, **kwargs):
    return _create("micro", pretrained, **kwargs)


@register_model
def unified_dcn_v3_tiny(pretrained: bool = False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def unified_dcn_v3_small(pretrained: bool = False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def unified_dcn_v3_base(pretrained: bool = False, **kwargs):
    return _create("base", pretrained, **kwargs)


@register_model
def unified_dcn_v3_large(pretrained: bool = False, **kwargs):
    return _create("large", pretrained, **kwargs)
