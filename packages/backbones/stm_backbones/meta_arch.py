"""The unified macro architecture (`MetaArch`) into which every spatial token mixer plugs.

One trunk (stem, three down-sampling layers, four stages of mixer blocks) serves two uses:

* classification (`dense=False`): stage norms between stages, then conv_head (1x1 conv + BN +
  GELU), global average pooling and a linear head;
* dense prediction (`dense=True`, the detection variant): no stage norms, a fresh `out_norm_{i}`
  per requested output, blocks built in their padding-tolerant mode; `forward` returns the list of
  normalised NCHW maps at strides 4, 8, 16, 32.

Blocks follow the mixer contract of `stm_backbones.mixer` (constructor keywords, optional hooks, family
policies).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import register_notrace_function, trunc_normal_
from timm.models._features import feature_take_indices
from torch import nn

from . import fast_paths
from .layers import LayerNorm2d
from .mixer import block_policy, split_block_key

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


GLOBAL_POOLS = ("avg", "")


def _check_global_pool(global_pool: str) -> str:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be 'avg' (average pooling) or '' (no pooling), got {global_pool!r}")
    return global_pool


# Block classes by name, so that the FX-opaque helpers below take plain data (FX graphs hold strings, not classes).
_BLOCK_TYPES: dict[str, type] = {}


def _block_key(block_type: type) -> str:
    key = f"{block_type.__module__}.{block_type.__qualname__}"
    _BLOCK_TYPES[key] = block_type
    return key


@register_notrace_function  # FX: an opaque call (its checks branch on the input's shape), kept in the graph
def check_input(image: torch.Tensor, block_key: str, img_size: tuple[int, int], dense: bool) -> torch.Tensor:
    """The input-size rules of a model (ValueError naming the problem); returns `image` unchanged."""
    if image.dim() != 4:
        raise ValueError(f"expected an image batch of shape (B, C, H, W), got {tuple(image.shape)}")
    if fast_paths.exporting():
        # the size rules read the sides as Python ints, which would pin an exported graph to the example's size;
        # stm_backbones.export constrains height and width to the sizes every model takes (multiples of 32)
        return image
    height, width = image.shape[-2:]
    if dense and (height % 32 or width % 32):
        raise ValueError(f"dense-prediction backbones take inputs whose sides are multiples of 32, "
                         f"got {height}x{width} (pad the image, as detectron2's size_divisibility=32 does)")
    block_type = _BLOCK_TYPES[block_key]
    rule = getattr(block_type, "input_size_error", None)
    if rule is not None:
        message = rule(int(height), int(width), img_size, dense)
        if message:
            raise ValueError(f"{block_type.__name__}: {message}")
    return image


@register_notrace_function  # FX: the per-stage inputs depend on the image size only (an opaque call)
def extra_stage_inputs(image: torch.Tensor, block_key: str, forward_kwargs: dict):
    """The block family's `extra_inputs(image, **forward_kwargs)` (DCNv3's reference points), or None."""
    hook = getattr(_BLOCK_TYPES[block_key], "extra_inputs", None)
    return hook(image, **forward_kwargs) if hook is not None else None


def _init_conv_linear(module: nn.Module) -> None:
    # The reference re-initialises every Conv2d/Linear of the network last, overriding in-block init.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MetaArch(nn.Module):
    """The unified trunk. timm semantics: `num_features` is the channel count of `forward_features`
    (dims[-1]), `head_hidden_size` the width of the pre-logits (`conv_head`'s output), `global_pool`
    'avg' or '' (no pooling: `forward` returns the (B, C, H, W) map, the head applied per position)."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_channels: int = 3,
        in_chans: int | None = None,  # timm's name for in_channels
        num_classes: int = 1000,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        # everything needed to rebuild this model at another input size (`set_input_size`)
        self._init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__", "device", "dtype")}
        if in_chans is not None:
            in_channels = in_chans
        if block_type is None:
            raise ValueError("MetaArch needs a block_type (the spatial token mixer block class)")
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"MetaArch has 4 stages; got depths={depths}, dims={dims}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        self.in_chans = in_channels
        self.num_classes = num_classes
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.block_type = block_type
        self._block_key = _block_key(block_type)
        self._has_extra_inputs = getattr(block_type, "extra_inputs", None) is not None
        self.forward_kwargs = dict(forward_kwargs or {})
        self.grad_checkpointing = use_checkpoint
        self.label_map_path = label_map_path
        self.dense = dense
        self.out_indices = tuple(out_indices)
        self.global_pool = _check_global_pool(global_pool)
        self.drop_rate = drop_rate

        with torch.device(device) if device is not None else contextlib.nullcontext():
            self._build(in_channels, num_classes, depths, dims, drop_path_rate, drop_rate, layer_scale_init_value,
                        stem_type, stem_kwargs, block_kwargs, downsample_type, downsample_kwargs, extra_transform,
                        extra_transform_ratio, norm_layer, norm_every_stage, norm_after_avg, act_layer)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _build(self, in_channels, num_classes, depths, dims, drop_path_rate, drop_rate, layer_scale_init_value,
               stem_type, stem_kwargs, block_kwargs, downsample_type, downsample_kwargs, extra_transform,
               extra_transform_ratio, norm_layer, norm_every_stage, norm_after_avg, act_layer) -> None:
        block_type, dense = self.block_type, self.dense
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

        # `module` names a module whose output is the feature (timm's hook/fx feature extractors use it):
        # the stage norm (what the next stage sees) for classifiers, the output norm for dense backbones.
        if dense:
            self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i,
                                      module=f"out_norm_{i}" if i in self.out_indices else f"stages.{i}")
                                 for i in range(4)]
            for i in self.out_indices:
                self.add_module(f"out_norm_{i}", LayerNorm2d(dims[i], eps=1e-6))
            self.num_features = self.head_hidden_size = dims[-1]
        else:
            self.feature_info = [dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stage_norms.{i}")
                                 for i in range(4)]
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
            self.num_features = dims[-1]  # channels of forward_features
            self.head_hidden_size = width  # channels of the pre-logits (after conv_head)
            self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
            self.head = nn.Linear(width, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_conv_linear)

    # ------------------------------------------------------------------ timm model API
    def _block_parameter_names(self, policy: str) -> set[str]:
        """Full names of the block parameters that the block family lists under `policy` (see mixer.py)."""
        listed = set(getattr(block_policy(self.block_type), policy))
        names = set()
        for name, _ in self.named_parameters():
            parts = split_block_key(name)
            if parts is not None and parts[2] in listed:
                names.add(name)
        return names

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """timm's API: parameters the classification recipe trains without weight decay (the family's
        `no_weight_decay_params`, e.g. Swin's relative-position tables)."""
        return self._block_parameter_names("no_weight_decay_params")

    @torch.jit.ignore
    def position_tables(self) -> set[str]:
        """Parameters that encode positions (the family's `position_tables`; the detection app does not decay
        them)."""
        return self._block_parameter_names("position_tables")

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
        """A fresh head for `num_classes` (0: none, `forward` returns the pre-logits); `global_pool` 'avg' or ''
        (None keeps the current one). The new head takes the device and dtype of the model's parameters."""
        if self.dense:
            raise RuntimeError("a dense-prediction (detection) backbone has no classifier")
        if global_pool is not None:
            self.global_pool = _check_global_pool(global_pool)
        self.num_classes = num_classes
        reference = next(self.parameters())
        if num_classes > 0:
            self.head = nn.Linear(self.head_hidden_size, num_classes, device=reference.device, dtype=reference.dtype)
            if reference.device.type != "meta":
                _init_conv_linear(self.head)
            self.head.train(self.training)
        else:
            self.head = nn.Identity()

    def set_input_size(self, img_size: int | Sequence[int] | None = None, **_: Any) -> None:
        """Rebuild for another input size: blocks whose geometry depends on it (Swin's windows and shift masks,
        PVT's position embeddings) are rebuilt and the current weights loaded into them with the checkpoint
        loader's rules (relative-position tables bicubic, PVT position embeddings bilinear). Parameters keep
        their device, dtype and requires_grad; the mode (train/eval) is kept."""
        if img_size is None:
            return
        from timm.models._input import update_model_input_size

        kwargs = dict(self._init_kwargs, img_size=img_size)
        if not self.dense:
            kwargs["num_classes"] = self.num_classes
            kwargs["global_pool"] = self.global_pool
        reference = next(self.parameters())
        rebuilt = type(self)(**kwargs, device=reference.device, dtype=reference.dtype)
        if not self.dense and self.num_classes > 0 and not isinstance(self.head, nn.Linear):
            raise RuntimeError("set_input_size: unexpected classifier type")
        frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
        rebuilt.load_state_dict(self.state_dict(), strict=True)
        for name, child in rebuilt.named_children():
            setattr(self, name, child)
        for name, param in self.named_parameters():
            param.requires_grad_(name not in frozen)
        self.img_size = rebuilt.img_size
        self._init_kwargs["img_size"] = img_size
        self.train(self.training)
        update_model_input_size(self, self.img_size)

    # ------------------------------------------------------------------ loading
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The study's loader: interpolates tables/pos-embeds, ignores stored index/mask buffers, strips the
        `module.` / `_orig_mod.` prefixes of DDP / torch.compile, and refuses non-finite weights."""
        from .checkpoint import adapt_state_dict, check_finite, check_state_dict_keys, strip_prefixes

        state_dict = strip_prefixes(state_dict)
        check_finite(state_dict, self)
        adapted = adapt_state_dict(self, state_dict)
        if strict:
            check_state_dict_keys(self, adapted)
        return super().load_state_dict(adapted, strict=False, assign=assign)

    # ------------------------------------------------------------------ forward
    def _check_input(self, image: torch.Tensor) -> torch.Tensor:
        return check_input(image, self._block_key, self.img_size, self.dense)

    def _run_stage(self, i: int, x: torch.Tensor, extra) -> torch.Tensor:
        x = self.downsample_layers[i](x)
        pre = getattr(self.block_type, "pre_stage_transform", None)
        post = getattr(self.block_type, "post_stage_transform", None)
        if pre is not None:
            x = pre(x)
        if extra is not None:
            x = (x, extra[i])
        for block in self.stages[i]:
            if self.grad_checkpointing and not fast_paths.is_tracing() and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if extra is not None:
            x = x[0]
        if post is not None:
            x = post(x)
        return x

    def _extra_inputs(self, image: torch.Tensor):
        if not self._has_extra_inputs:
            return None
        return extra_stage_inputs(image, self._block_key, self.forward_kwargs)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's intermediate-feature API: stage outputs at strides 4, 8, 16, 32.

        `norm=False`: each stage's raw output; `norm=True`: after its norm, i.e. what the next stage (or the
        head) sees: the stage norm of classifiers (plus the final norm on the last stage, where the model has
        one), the `out_norm_{i}` of dense backbones. `output_fmt` 'NCHW' or 'NHWC'. The final output (first
        element when not `intermediates_only`) is `forward_features`' output whatever `norm` is.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        x = self._check_input(x)
        take, max_index = feature_take_indices(len(self.stages), indices)
        extra = self._extra_inputs(x)
        intermediates = []
        last = min(max_index if stop_early else 3, len(self.stages) - 1)
        for i in range(last + 1):
            x = self._run_stage(i, x, extra)
            if self.dense:
                feature = x
                if norm:
                    norm_i = getattr(self, f"out_norm_{i}", None)
                    feature = norm_i(x) if norm_i is not None else x
            else:
                raw = x
                x = self.stage_norms[i](x)
                feature = x if norm else raw
                if norm and i == len(self.stages) - 1:
                    feature = self.stage_end_norm(feature)
            if i in take:
                intermediates.append(feature.permute(0, 2, 3, 1) if output_fmt == "NHWC" else feature)
        if intermediates_only:
            return intermediates
        if self.dense:
            return x, intermediates
        return self.stage_end_norm(x), intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the stages after the last of `indices` (timm's contract). `prune_norm`: the last kept stage's norm
        (and the final norm) become identities, so `forward_features` ends at the raw tap; `prune_head`: no
        conv_head and no classifier."""
        take, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        if not self.dense:
            self.stage_norms = self.stage_norms[: max_index + 1]
            if prune_norm:
                self.stage_norms[max_index] = nn.Identity()
                self.stage_end_norm = nn.Identity()
            if prune_head:
                self.conv_head = nn.Identity()
                self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            raise RuntimeError("use forward() on a dense-prediction backbone: it returns the multi-scale maps")
        x = self._check_input(x)
        extra = self._extra_inputs(x)
        for i in range(len(self.stages)):
            x = self._run_stage(i, x, extra)
            x = self.stage_norms[i](x)
        return self.stage_end_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv_head(x)
        if self.global_pool == "avg":
            x = self.avg_norm(x.mean(dim=(2, 3)))
            x = self.head_drop(x)
            return x if pre_logits else self.head(x)
        # no pooling: the pre-logits map, and the classifier applied at every position
        x = self.head_drop(self.avg_norm(x))
        if pre_logits or isinstance(self.head, nn.Identity):
            return x
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor):
        if self.dense:
            return self.forward_intermediates(x, indices=list(self.out_indices), norm=True, intermediates_only=True)
        return self.forward_head(self.forward_features(x))
