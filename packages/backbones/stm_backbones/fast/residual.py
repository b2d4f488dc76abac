"""Residual branches `residual + drop_path(γ·f(x))` in fewer passes over memory.

Plain form: `x + drop_path(gamma * y)` is up to three passes (scale, per-sample mask, add). Here γ and
DropPath's per-sample multiplier become one small factor for a single `addcmul`, and a branch ending in a
linear layer uses the residual as the GEMM's accumulator (`addmm`), with γ folded into the weight when the
weight is smaller than the activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from .. import fast_paths
from ..layers import scale
from .autocast import autocast_enabled


def residual_add(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor | None,
                 drop_path: nn.Module) -> torch.Tensor:
    """`x + drop_path(scale(y, gamma))` in one fused `addcmul` (one pass instead of up to three).

    γ and timm's per-sample DropPath multiplier are folded into one small (B, 1, .., C) factor first; the
    random draw is the one `timm.layers.drop_path` makes (same shape, dtype and generator calls), so a
    seeded training run draws the same samples. Any other `drop_path` module takes the unfused route.
    """
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0.0:
        keep = 1.0 - drop_path.drop_prob
        dtype = y.dtype if gamma is None else torch.promote_types(gamma.dtype, y.dtype)  # = the γ·y dtype
        keep_mask = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1), dtype=dtype).bernoulli_(keep)
        if keep > 0.0 and drop_path.scale_by_keep:
            keep_mask.div_(keep)
        factor = keep_mask if gamma is None else gamma * keep_mask
    elif isinstance(drop_path, (nn.Identity, DropPath)):
        factor = gamma
    else:
        return x + drop_path(scale(y, gamma))
    if factor is None:
        return x + y
    return torch.addcmul(x, y, factor)


def fold_layer_scale(weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None):
    """(γ·W, γ·b): `gamma * linear(x, W, b)` as one linear (γ per output channel; None means no γ)."""
    if gamma is None:
        return weight, bias
    return gamma[:, None] * weight, (None if bias is None else gamma * bias)


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity) or (
        isinstance(module, DropPath) and (module.drop_prob == 0.0 or not module.training))


def residual_linear(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """residual + linear(x, weight, bias), with the residual as the GEMM's accumulator (one pass fewer)."""
    if not fast_paths.eager_kernels() or autocast_enabled(x.device.type) or residual.shape[:-1] != x.shape[:-1]:
        return residual + F.linear(x, weight, bias)
    out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        out = out.add_(bias) if not out.requires_grad else out + bias
    return out.view(residual.shape)


def _fold_is_cheaper(weight: torch.Tensor, x: torch.Tensor) -> bool:
    # folding γ into W touches in·out weight entries (3 passes with autograd), scaling the output touches
    # rows·out activations: fold when in_features <= rows
    return weight.shape[1] * x.shape[-1] <= x.numel()


def linear_branch(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  gamma: torch.Tensor | None = None, drop_path: nn.Module | None = None) -> torch.Tensor:
    """residual + drop_path(γ·linear(x, weight, bias)): a block's mixer output projection + residual."""
    drop_path = nn.Identity() if drop_path is None else drop_path
    if not fast_paths.eager_kernels():  # (not residual_add: its torch.result_type call breaks Dynamo's graph)
        return residual + drop_path(scale(F.linear(x, weight, bias), gamma))
    if gamma is not None and _fold_is_cheaper(weight, x):
        weight, bias = fold_layer_scale(weight, bias, gamma)
        gamma = None
    if gamma is None and _is_identity(drop_path):
        return residual_linear(residual, x, weight, bias)
    return residual_add(residual, F.linear(x, weight, bias), gamma, drop_path)


