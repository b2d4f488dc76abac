"""Small building blocks shared by the meta-architecture and the mixer blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from . import fast_paths


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (keys `weight`, `bias`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsLastLayerNorm(nn.Module):
    """Holds an `nn.LayerNorm` as child `norm` and applies it to an NCHW map channels-last.

    Exists only to reproduce the DCNv3 key `attn.dw_conv.1.norm.*`; input NCHW, output NHWC.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1))


def drop_path_or_identity(rate: float) -> nn.Module:
    """Stochastic depth with timm semantics; a rate of exactly 0 gets an identity."""
    return DropPath(rate) if rate > 0.0 else nn.Identity()


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on channels-last tokens (keys `fc1.*`, `fc2.*` as in timm's Mlp)."""

    def __init__(self, dim: int, hidden: int, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def layer_scale(dim_shape: tuple[int, ...], init_value: float) -> nn.Parameter | None:
    """A learnable per-channel multiplier γ, or None when `init_value <= 0` (no parameter)."""
    if init_value is None or init_value <= 0:
        return None
    return nn.Parameter(init_value * torch.ones(dim_shape))


def scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else gamma * x


class SizeCache:
    """A few recently used tensors that depend only on a map/image size, keyed by (size, device, ...).

    Bounded (detection sees many sizes: the cache is emptied when full) and bypassed while torch.compile
    traces. Values are shared between callers: treat them as read-only. Never part of a state_dict.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self.entries: dict[tuple, Any] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        if fast_paths.compiling():
            return build()
        value = self.entries.get(key)
        if value is None:
            if len(self.entries) >= self.capacity:
                self.entries.clear()
            value = self.entries[key] = build()
        return value
