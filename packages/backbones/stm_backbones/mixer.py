"""The mixer contract: what a spatial-token-mixer block gives the meta-architecture, in one place.

A mixer is a `MixerBlock` subclass plus a size table, registered with `stm_backbones.register_mixer`
(see the README, "Adding a new token mixer"). `MetaArch` builds `depths[i]` blocks per stage and calls
them in order; the central code (the checkpoint loader, both apps' optimizers, the input-size checks)
asks the block class for everything that differs between families instead of matching names.

Constructor. MetaArch passes these keywords to every block, then the family's `block_kwargs`:

* `dim`: channels of the stage; `drop_path`: this block's stochastic-depth rate (0 for none);
* `stage` (0-3), `depth` (index in the stage), `total_depth` (index in the network);
* `input_resolution`: the stage's (H, W) for the model's `img_size` (classification geometry);
* `layer_scale_init_value`: γ's initial value; `layer_scale` returns None (no γ) when it is <= 0;
* `dense`: the detection variant, which must take any stage size whose image sides are multiples of 32.

Accept `**kwargs` so that keywords for other families are ignored. Per-stage settings come as tuples
indexed by `stage` (`per_stage(num_heads, stage)`).

Forward: an NCHW map to an NCHW map of the same shape (the residual branches inside). With an
`extra_inputs` hook, blocks take and return `(x, stage_inputs)` tuples.

Optional hooks (static methods, None when unused):

* `pre_stage_transform(x)` / `post_stage_transform(x)`: applied to each stage's input / output (e.g. to
  run a whole stage channels-last, the blocks then map NHWC to NHWC);
* `extra_inputs(image, **forward_kwargs)`: a list of 4 per-stage side inputs computed from the image
  batch once per forward (DCNv3's reference points);
* `input_size_error(height, width, img_size, dense)`: a message for image sizes the model cannot take,
  None for sizes that work. The apps search sizes that work with it.

Family policies (class attributes and a class method; names are relative to the block, e.g.
`attn.relative_position_bias_table` for `stages.2.3.attn.relative_position_bias_table`):

* `no_weight_decay_params`: parameters trained without weight decay by the classification recipe (besides
  every 1-D parameter, which both apps exempt anyway);
* `position_tables`: parameters that encode positions (the detection app exempts them from decay);
* `derived_buffers`: buffers computed from the geometry (index tables, masks), never read from a checkpoint;
* `adapt_checkpoint_tensor(name, value, target)`: a checkpoint tensor brought to the model's geometry
  (e.g. a relative-position table interpolated to another window size); the default keeps it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["MixerBlock", "per_stage", "split_block_key"]

_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.(\d+)\.(.+)$")


def split_block_key(key: str) -> tuple[int, int, str] | None:
    """`stages.{i}.{j}.{name}` -> (i, j, name), the name relative to the block; None for other keys."""
    match = _BLOCK_KEY.match(key)
    return None if match is None else (int(match[1]), int(match[2]), match[3])


def per_stage(value: Any, stage: int) -> Any:
    """`value[stage]` for per-stage tuples/lists, `value` itself for a single number."""
    return value[stage] if isinstance(value, (tuple, list)) else value


class MixerBlock(nn.Module):
    """Base class of the mixer blocks; the contract is in this module's docstring."""

    pre_stage_transform: ClassVar[Any] = None
    post_stage_transform: ClassVar[Any] = None
    extra_inputs: ClassVar[Any] = None

    no_weight_decay_params: ClassVar[tuple[str, ...]] = ()
    position_tables: ClassVar[tuple[str, ...]] = ()
    derived_buffers: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def input_size_error(height: int, width: int, img_size: Sequence[int], dense: bool) -> str | None:
        return None

    @classmethod
    def adapt_checkpoint_tensor(cls, name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return value


def block_policy(block_type: type) -> type:
    """The class whose policies apply to `block_type` (itself; plain nn.Modules get the defaults)."""
    return block_type if issubclass(block_type, MixerBlock) else MixerBlock
