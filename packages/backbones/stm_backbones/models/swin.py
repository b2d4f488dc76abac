"""U-Swin: shifted-window self-attention as the spatial token mixer (spec §2.4), plus `official_swin_tiny`.

Two modes of `SwinBlock`:

* classification (`dense=False`): the window/shift geometry and the shift mask (`attn_mask` buffer) are
  fixed at construction from the nominal stage resolution. When `min(resolution) <= window`, the window
  shrinks to the resolution and the block does not shift.
* dense (`dense=True`, the detection variant of spec §5): window 7 and shift 3 for odd blocks in every
  stage, no `attn_mask` buffer; inputs of any size are zero-padded (right/bottom) to multiples of the
  window after `norm1`, and the shift mask is built for the padded size.

The reference cannot run a classifier whose stage resolution is larger than the window and not a multiple
of it (e.g. `img_size=64`: 16x16 in stage 0). We run such stages the way the dense variant does (pad after
`norm1`, mask built for the padded size at construction); at the study's 224 nothing is padded.

Fast path (same math as the straightforward formulation up to float rounding): the block works on a
channels-last (B, H, W, C) view of its NCHW input and returns an NCHW view of channels-last memory; the
cyclic shift and the window partition are one token gather (`window_order`) and their inverses another;
the relative-position bias and the shift mask are added to the logits as one precomputed additive mask;
without autograd through that mask (inference) attention runs as fused
`F.scaled_dot_product_attention`, and the bias/mask, which depends only on the table, is cached.
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
from ..layers import LayerNorm2d, Mlp, SizeCache, drop_path_or_identity, layer_scale, residual_add
from ..registry import register_model

SHIFT_MASK_VALUE = -100.0


# ------------------------------------------------------------------------------------------ geometry
def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def stage_resolutions(height: int, width: int) -> list[tuple[int, int]]:
    """Feature-map sizes of the four stages for an input image: stem = ceil(/4), each downsample ceil(/2)."""
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    sizes = [(h, w)]
    for _ in range(3):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def nominal_resolutions(img_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """The stage resolutions MetaArch builds the blocks for: (img // 4) // 2**i."""
    height, width = _pair(img_size)
    return [((height // 4) // 2**i, (width // 4) // 2**i) for i in range(4)]


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


def window_order(height: int, width: int, window: int, shift: int,
                 device: torch.device | str | None = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Token permutation of `window_partition(roll(y, (-shift, -shift)))` on a row-major (H·W) token axis.

    Returns (order, inverse), int64 of length H·W: window token j (windows ordered window row, window
    column; tokens row-major) is map token order[j]; `inverse` undoes it (window_reverse + roll back).
    """
    rows = torch.arange(height, device=device).view(height // window, 1, window, 1)
    cols = torch.arange(width, device=device).view(1, width // window, 1, window)
    order = (((rows + shift) % height) * width + (cols + shift) % width).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return order, inverse


class _PermuteTokens(torch.autograd.Function):
    """`x.index_select(1, order)` for a permutation: the backward is the inverse gather, not a scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """(B, L, C) -> (B, L, C) with token j = x[:, order[j]]; `inverse` is the inverse permutation."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return x.index_select(1, order)  # traced graphs (fvcore, export) see a plain aten op
    return _PermuteTokens.apply(x, order, inverse)


class _SoftmaxFlushDenormals(torch.autograd.Function):
    """softmax(x) with outputs below finfo.tiny (denormals) set to 0, and the matching softmax backward.

    A key masked with -100 gets a weight of about e^-100 ≈ 4e-44: a float32 *denormal*, on which the CPU's
    matrix products (attn @ v and the backward products) run an order of magnitude slower. Zeroing it
    changes each output by less than 1e-37 of the values' scale (no effect in float64: e^-100 is normal).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, dim: int) -> torch.Tensor:
        probs = torch.softmax(logits, dim)
        F.threshold_(probs, torch.finfo(probs.dtype).tiny, 0.0)
        ctx.save_for_backward(probs)
        ctx.dim = dim
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(grad, probs, ctx.dim, probs.dtype), None


def softmax_flush_denormals(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return logits.softmax(dim)
    return _SoftmaxFlushDenormals.apply(logits, dim)


# ------------------------------------------------------------------------------------------ attention
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
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None  # inference only, never in the state_dict

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N): bias[h, p, q] = table[index[p, q], h]."""
        tokens = self.window_size ** 2
        index = self.relative_position_index.to(self.relative_position_bias_table.device)
        bias = self.relative_position_bias_table[index.reshape(-1)].view(tokens, tokens, self.num_heads)
        return bias.permute(2, 0, 1)

    def attention_bias(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(nW or 1, heads, N, N): relative-position bias plus the (nW, N, N) shift mask, if any."""
        bias = self.relative_position_bias().unsqueeze(0)
        return bias if mask is None else bias + mask.unsqueeze(1)

    def _inference_mask(self, mask: torch.Tensor | None, windows: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive SDPA mask for `windows` windows, (windows or 1, heads, N, N), cached while the table,
        index and shift mask are unchanged (keyed on their storage and version counters)."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        cacheable = not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                         or any(t.is_inference() for t in (table, index, mask) if t is not None))  # no versions
        key = None
        if cacheable:
            key = (windows, dtype, table.device, table.data_ptr(), table._version, index.data_ptr(), index._version,
                   None if mask is None else (mask.data_ptr(), mask._version, mask.shape))
            if self._bias_cache is not None and self._bias_cache[0] == key:
                return self._bias_cache[1]
        bias = self.attention_bias(mask).to(dtype)
        if bias.shape[0] > 1:  # one mask per window: materialise it over the batch (SDPA broadcasts dims of size 1)
            count, tokens = bias.shape[0], bias.shape[-1]
            bias = bias.expand(windows // count, count, self.num_heads, tokens, tokens)
            bias = bias.reshape(windows, self.num_heads, tokens, tokens)
        if cacheable:
            self._bias_cache = (key, bias)
        return bias

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * nW, N, C) windows; mask: (nW, N, N) added to the logits of every batch element."""
        windows, tokens, _ = x.shape
        heads, dim = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(windows, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B * nW, heads, N, d)
        if torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad:
            # autograd through the bias: fused SDPA gives no gradient for its mask, so spell it out
            bias = self.attention_bias(mask)
            attn = (q * self.scale) @ k.transpose(-2, -1)  # the scale is applied to q before the product
            count = bias.shape[0]
            attn = (attn.view(windows // count, count, heads, tokens, tokens) + bias).view(
                windows, heads, tokens, tokens)
            out = softmax_flush_denormals(attn, -1) @ v
        else:
            attn_mask = self._inference_mask(mask, windows, q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = ops.reshape_copy(out.transpose(1, 2), (windows, tokens, heads * dim))
        return self.proj(out)


# ------------------------------------------------------------------------------------------ block
@register_notrace_module  # FX (feature_cls="fx", timm's tests): one opaque call per block
class SwinBlock(nn.Module):
    """NCHW in/out. (Shifted-)window attention on LN2d(x), then an MLP on LN2d(x); both with γ and DropPath."""

    def __init__(self, dim: int, drop_path: float = 0.0, stage: int = 0, depth: int = 0,
                 input_resolution: Sequence[int] = (56, 56), layer_scale_init_value: float = 1e-6,
                 dense: bool = False, num_heads: int | Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, **_: Any):
        super().__init__()
        heads = num_heads if isinstance(num_heads, int) else num_heads[stage]
        self.dense = dense
        self.input_resolution = _pair(input_resolution)
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
        if not dense:  # fixed geometry: the token gathers are non-persistent buffers (never in the state_dict)
            height, width = (math.ceil(n / window_size) * window_size for n in self.input_resolution)
            order, inverse = window_order(height, width, window_size, shift, device="cpu")
            self.register_buffer("window_order_index", order, persistent=False)
            self.register_buffer("window_order_inverse", inverse, persistent=False)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = WindowAttention(dim, heads, window_size, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_or_identity(drop_path)
        self._masks = SizeCache()
        self._orders = SizeCache()

    # ---- meta-architecture hook
    @staticmethod
    def input_size_error(height: int, width: int, img_size, dense: bool) -> str | None:
        if dense:
            return None  # blocks pad to the window; MetaArch checks the multiple-of-32 rule
        built = _pair(img_size)
        expected = nominal_resolutions(built)
        if stage_resolutions(height, width) == expected:
            return None
        message = f"built for {built[0]}x{built[1]} inputs, got {height}x{width}"
        if stage_resolutions(*built) != expected:
            return (f"img_size={built[0] if built[0] == built[1] else built} gives stage resolutions {expected} "
                    f"that no input produces (a {height}x{width} input gives {stage_resolutions(height, width)}): "
                    "build it with an img_size whose sides are multiples of 32")
        if stage_resolutions(height, width) == nominal_resolutions((height, width)):
            suggestion = height if height == width else (height, width)
            return message + f"; pass img_size={suggestion} to timm.create_model to change it"
        rounded = tuple(32 * math.ceil(n / 32) for n in (height, width))
        suggestion = rounded[0] if rounded[0] == rounded[1] else rounded
        return (message + f"; the window masks are fixed at construction: pad/resize the input to sides that "
                f"are multiples of 32 and pass e.g. img_size={suggestion} to timm.create_model, or use "
                "stm_backbones.create_dense_backbone, which takes any multiple of 32")

    # ---- forward
    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        if self.shift_size == 0:
            return None
        if not self.dense:
            return self.attn_mask
        return self._masks.get((height, width, device), lambda: shift_window_mask(
            height, width, self.window_size, self.shift_size, device=device))

    def _window_order(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.dense:
            return self.window_order_index, self.window_order_inverse
        return self._orders.get((height, width, device), lambda: window_order(
            height, width, self.window_size, self.shift_size, device=device))

    def mix(self, y: torch.Tensor) -> torch.Tensor:
        """Shifted-window attention on a channels-last (B, H, W, C) map (already normalised)."""
        batch, height, width, channels = y.shape
        window = self.window_size
        pad_bottom, pad_right = (-height) % window, (-width) % window
        if pad_bottom or pad_right:
            y = F.pad(y, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_h, padded_w = height + pad_bottom, width + pad_right
        order, inverse = self._window_order(padded_h, padded_w, y.device)
        # roll by -shift + window_partition as one gather; window_reverse + roll back as the inverse one
        windows = permute_tokens(y.reshape(batch, padded_h * padded_w, channels), order, inverse)
        windows = self.attn(windows.view(-1, window * window, channels),
                            self._shift_mask(padded_h, padded_w, y.device))
        y = permute_tokens(windows.view(batch, padded_h * padded_w, -1), inverse, order)
        y = y.view(batch, padded_h, padded_w, -1)
        if pad_bottom or pad_right:
            y = y[:, :height, :width]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dense and tuple(x.shape[-2:]) != self.input_resolution:
            raise ValueError(f"SwinBlock built for a {self.input_resolution[0]}x{self.input_resolution[1]} map "
                             f"(its shift mask is fixed), got {x.shape[-2]}x{x.shape[-1]}")
        y = x.permute(0, 2, 3, 1)  # channels-last view; free for the output of a previous block
        if not y.is_contiguous():
            y = y.contiguous()
        norm1, norm2 = self.norm1, self.norm2
        h = self.mix(F.layer_norm(y, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps))
        y = residual_add(y, h, self.gamma_1, self.drop_path)
        h = F.layer_norm(y, norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps)
        # y is this block's own fresh tensor: the no-grad path may accumulate into it
        y = ops.mlp_branch(y, h, self.mlp.fc1, self.mlp.fc2, self.gamma_2, self.drop_path, inplace=True,
                           act=self.mlp.act)
        return y.permute(0, 3, 1, 2)


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
        self.img_size = _pair(img_size)
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
OFFICIAL_TINY = dict(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.2)


def _create(size: str, pretrained: bool, **kwargs):
    table = dict(SIZES[size])
    heads = table.pop("num_heads")
    args = dict(img_size=224, block_type=SwinBlock, block_kwargs=dict(num_heads=heads, window_size=7, mlp_ratio=4.0),
                **table)
    return build_model(f"unified_swin_{size}", pretrained, **{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    **{f"unified_swin_{s}": study_cfg(f"unified_swin_{s}.pth", fixed_input_size=True) for s in SIZES},
    # not one of the study's released checkpoints: no file name (study_filename() gives None)
    "official_swin_tiny": study_cfg(None, notes=(), fixed_input_size=True, first_conv="downsample_layers.0.proj"),
})


@register_model
def unified_swin_micro(pretrained: bool = False, **kwargs):
    return _create("micro", pretrained, **kwargs)


@register_model
def unified_swin_tiny(pretrained: bool = False, **kwargs):
    return _create("tiny", pretrained, **kwargs)


@register_model
def unified_swin_small(pretrained: bool = False, **kwargs):
    return _create("small", pretrained, **kwargs)


@register_model
def unified_swin_base(pretrained: bool = False, **kwargs):
    return _create("base", pretrained, **kwargs)


@register_model
def official_swin_tiny(pretrained: bool = False, **kwargs):
    """The original Swin-T macro design (patch-embed stem, patch merging, one final norm) in MetaArch."""
    table = dict(OFFICIAL_TINY)
    heads = table.pop("num_heads")
    args = dict(img_size=224, block_type=SwinBlock, block_kwargs=dict(num_heads=heads, window_size=7, mlp_ratio=4.0),
                stem_type=SwinPatchEmbed, stem_kwargs=dict(check_size=not kwargs.get("dense", False)),
                downsample_type=PatchMerging, extra_transform=False, norm_every_stage=False, **table)
    return build_model("official_swin_tiny", pretrained, **{**args, **kwargs})
