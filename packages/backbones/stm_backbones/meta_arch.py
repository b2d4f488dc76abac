"""The unified macro architecture (`MetaArch`) into which every spatial token mixer plugs.

One trunk (stem, three down-sampling layers, four stages of mixer blocks) serves two uses:

* classification (`dense=False`): stage norms between stages, then conv_head (1x1 conv + BN +
  GELU), global average pooling and a linear head;
* dense prediction (`dense=True`, the detection variant): no stage norms, a fresh `out_norm_{i}`
  per requested output, blocks built in their padding-tolerant mode; `forward` returns the list of
  normalised NCHW maps at strides 4, 8, 16, 32.

Blocks are constructed with `dim, drop_path, stage, depth, total_depth, input_resolution,
layer_scale_init_value, dense` plus the family's `block_kwargs`. Optional static hooks on the block
class: `pre_stage_transform(x)`, `post_stage_transform(x)`, `extra_inputs(image, **forward_kwargs)`
and `input_size_error(height, width, img_size, dense) -> str | None`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

from .layers import LayerNorm2d

DEFAULT_NORM = partial(LayerNorm2d, eps=1e-6)


class Stem(nn.Module):
    """Two stride-2 3x3 convs (both with bias) with LN2d and GELU: `downsample_layers.0.stem.*`."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer=DEFAULT_NORM, act_layer=nn.GELU,
                 ratio: float = 0.5, **_: Any):
        super().__init__()
        hidden = int(out_channels * ratio)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1),
            norm_layer(hidden),
            act_layer(),
            nn.Conv2d(hidden, out_channels, 3, stride=2, padding=1),
            norm_layer(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from the first conv on, as every later layer computes: oneDNN's 3-channel conv is
        # faster on NHWC memory, and the LayerNorm over channels then reads a free view instead of a copy.
        return self.stem(x.contiguous(memory_format=torch.channels_last))


class DownsampleLayer(nn.Module):
    """Stride-2 3x3 conv without bias, then LN2d: `downsample_layers.{1,2,3}.reduction.*`."""

    def __init__(self, in_channels: int, out_channels: int, norm_layer=DEFAULT_NORM, **_: Any):
        super().__init__()
        self.reduction = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
            norm_layer(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(x)


def _init_conv_linear(module: nn.Module) -> None:
    # The reference re-initialises every Conv2d/Linear of the network last, overriding in-block init.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MetaArch(nn.Module):
    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_channels: int = 3,
        in_chans: int | None = None,  # timm's name for in_channels
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-6,
        stem_type: Callable[..., nn.Module] = Stem,
        stem_kwargs: dict | None = None,
        block_type: type[nn.Module] | None = None,
        block_kwargs: dict | None = None,
        downsample_type: Callable[..., nn.Module] = DownsampleLayer,
        downsample_kwargs: dict | None = None,
        extra_transform: bool = True,
        extra_transform_ratio: float = 1.5,
        norm_layer: Callable[..., nn.Module] = DEFAULT_NORM,
        norm_every_stage: bool = True,
        norm_after_avg: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        forward_kwargs: dict | None = None,
        use_checkpoint: bool = False,
        label_map_path: str | None = None,
        dense: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        global_pool: str = "avg",
        **_ignored: Any,  # e.g. `num_heads` from the DCNv3 factories, `pretrained_cfg` from timm
    ):
        super().__init__()
        if in_chans is not None:
            in_channels = in_chans
        if block_type is None:
            raise ValueError("MetaArch needs a block_type (the spatial token mixer block class)")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MetaArch has 4 stages; got depths={depths}, dims={dims}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.block_type = block_type
        self.forward_kwargs = dict(forward_kwargs or {})
        self.grad_checkpointing = use_checkpoint
        self.label_map_path = label_map_path
        self.dense = dense
        self.out_indices = tuple(out_indices)
        self.global_pool = global_pool

        patch_grid = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.downsample_layers = nn.ModuleList()
        self.downsample_layers.append(stem_type(in_channels=in_channels, out_channels=dims[0], norm_layer=norm_layer,
                                                act_layer=act_layer, img_size=self.img_size, **(stem_kwargs or {})))
        for i in range(1, 4):
            self.downsample_layers.append(downsample_type(in_channels=dims[i - 1], out_channels=dims[i],
                                                          norm_layer=norm_layer, stage=i,
                                                          **(downsample_kwargs or {})))

        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        block_index = 0
        for i in range(4):
            resolution = (patch_grid[0] // 2**i, patch_grid[1] // 2**i)
            blocks = []
            for j in range(depths[i]):
                blocks.append(block_type(
                    dim=dims[i], drop_path=rates[block_index], stage=i, depth=j, total_depth=block_index,
                    input_resolution=resolution, layer_scale_init_value=layer_scale_init_value, dense=dense,
                    **(block_kwargs or {}),
                ))
                block_index += 1
            self.stages.append(nn.Sequential(*blocks) if dense else nn.ModuleList(blocks))

        self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)]
        if dense:
            for i in self.out_indices:
                self.add_module(f"out_norm_{i}", LayerNorm2d(dims[i], eps=1e-6))
            self.num_features = self.head_hidden_size = dims[-1]
        else:
            self.stage_norms = nn.ModuleList(
                [norm_layer(d) if norm_every_stage else nn.Identity() for d in dims])
            self.stage_end_norm = (nn.Identity() if (norm_every_stage or norm_after_avg) else norm_layer(dims[-1]))
            if extra_transform:
                width = int(dims[-1] * extra_transform_ratio)
                self.conv_head = nn.Sequential(nn.Conv2d(dims[-1], width, 1, bias=False), nn.BatchNorm2d(width),
                                               act_layer())
            else:
                width = dims[-1]
                self.conv_head = nn.Identity()
            self.avg_norm = norm_layer(width) if norm_after_avg else nn.Identity()
            self.num_features = self.head_hidden_size = width
            self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_conv_linear)

    # ------------------------------------------------------------------ timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"absolute_pos_embed"}
        names.update(n for n, _ in self.named_parameters() if "relative_position_bias_table" in n)
        return names

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^downsample_layers\.0", blocks=[
            (r"^downsample_layers\.(\d+)", None),
            (r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
            (r"^stage_norms\.(\d+)", (99999,)),
        ])

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if self.dense:
            raise RuntimeError("a dense-prediction (detection) backbone has no classifier")
        self.num_classes = num_classes
        device = next(self.parameters()).device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The study's loader: interpolates tables/pos-embeds, ignores stored index/mask buffers."""
        from .checkpoint import adapt_state_dict, check_state_dict_keys

        adapted = adapt_state_dict(self, state_dict)
        if strict:
            check_state_dict_keys(self, adapted)
        return super().load_state_dict(adapted, strict=False, assign=assign)

    # ------------------------------------------------------------------ forward
    def _check_input(self, image: torch.Tensor) -> None:
        if image.dim() != 4:
            raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if self.dense and (height % 32 or width % 32):
            raise ValueError(f"dense-prediction backbones take inputs whose sides are multiples of 32, "
                             f"got {height}x{width} (pad the image, as detectron2's size_divisibility=32 does)")
        rule = getattr(self.block_type, "input_size_error", None)
        if rule is not None:
            message = rule(int(height), int(width), self.img_size, self.dense)
            if message:
                raise ValueError(f"{self.block_type.__name__}: {message}")

    def _run_stage(self, i: int, x: torch.Tensor, extra) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        pre = getattr(self.block_type, "pre_stage_transform", None)
        post = getattr(self.block_type, "post_stage_transform", None)
        if pre is not None:
            x = pre(x)
        if extra is not None:
            x = (x, extra[i])
        for block in self.stages[i]:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if extra is not None:
            x = x[0]
        if post is not None:
            x = post(x)
        return x

    def _extra_inputs(self, image: torch.Tensor):
        hook = getattr(self.block_type, "extra_inputs", None)
        return hook(image, **self.forward_kwargs) if hook is not None else None

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API: stage outputs at strides 4, 8, 16, 32 (NCHW).

        Classification models return each stage's output after its stage norm (what the next
        stage sees); dense backbones return the `out_norm_{i}` outputs.
        """
        if output_fmt != "NCHW":
            raise ValueError("only output_fmt='NCHW' is supported")
        self._check_input(x)
        take, max_index = feature_take_indices(4, indices)
        extra = self._extra_inputs(x)
        intermediates = []
        last = min(max_index if stop_early else 3, len(self.stages) - 1)
        for i in range(last + 1):
            x = self._run_stage(i, x, extra)
            if self.dense:
                if i in take:
                    norm_i = getattr(self, f"out_norm_{i}", None)
                    intermediates.append(norm_i(x) if norm_i is not None else x)
            else:
                x = self.stage_norms[i](x)
                if i in take:
                    intermediates.append(x)
        if intermediates_only:
            return intermediates
        if self.dense:
            return x, intermediates
        return self.stage_end_norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take, max_index = feature_take_indices(4, indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        if prune_head and not self.dense:
            self.conv_head = nn.Identity()
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            raise RuntimeError("use forward() on a dense-prediction backbone: it returns the multi-scale maps")
        self._check_input(x)
        extra = self._extra_inputs(x)
        for i in range(4):
            x = self._run_stage(i, x, extra)
            x = self.stage_norms[i](x)
        return self.stage_end_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv_head(x)
        x = self.avg_norm(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor):
        if self.dense:
            return self.forward_intermediates(x, indices=list(self.out_indices), intermediates_only=True)
        return self.forward_head(self.forward_features(x))
