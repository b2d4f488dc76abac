"""Pure-PyTorch multi-scale deformable attention (grid_sample formulation).

The one pure-PyTorch implementation of the op: the fallback of ``ms_deform_attn`` when the compiled
extension is missing (and inside ``use_reference()``, e.g. for an ONNX export, where it becomes
GridSample), and the test oracle. Differentiable by autograd in all three floating inputs, runs on any
device, supports any batch size.

Non-finite sampling locations (NaN, +-inf) count as out of range, exactly as in the compiled
kernels (whose strict range test fails for them): zero contribution, zero gradient. grid_sample
alone would return NaN for them, so results would depend on whether the extension is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["check_tensor_args", "grid_sample_msda", "level_sizes", "ms_deform_attn_reference"]

_TENSOR_ARGS = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def check_tensor_args(*args) -> None:
    """TypeError naming the argument when one of the five inputs is not a torch.Tensor (e.g. a
    numpy array, which would otherwise fail deep inside with an unrelated message)."""
    for name, arg in zip(_TENSOR_ARGS, args):
        if not isinstance(arg, torch.Tensor):
            kind = f"{type(arg).__module__}.{type(arg).__qualname__}".removeprefix("builtins.")
            hint = " (convert it with torch.from_numpy(...) or torch.as_tensor(...))" if kind.startswith("numpy.") else ""
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {kind}{hint}")


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    *,
    static_shapes: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Multi-scale deformable attention computed level by level with ``F.grid_sample``.

    Args:
        value: (N, S, M, D) per-head values of all levels, concatenated along S.
        spatial_shapes: (L, 2) int64 rows (H_l, W_l); S = sum of H_l * W_l.
        level_start_index: (L,) int64 start row of each level (unused: levels are taken in order).
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; 0 is the outer edge
            of the first pixel, so pixel centres sit at (i + 0.5) / size.
        attention_weights: (N, Lq, M, L, P).
        im2col_step: accepted for API compatibility; has no effect.
        static_shapes: optional ``spatial_shapes`` as Python int pairs ((H_0, W_0), ...). The tensor is
            then never read back: no device synchronisation, and nothing data-dependent for
            ``torch.export`` / ``torch.compile`` to trace. Must describe the same levels.

    Returns:
        (N, Lq, M * D); channel m * D + d belongs to head m. Samples with a NaN or infinite
        coordinate are out of range (zero output and gradient), as in the compiled kernels.
    """
    check_tensor_args(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    del level_start_index, im2col_step
    return grid_sample_msda(value, level_sizes(spatial_shapes, static_shapes), sampling_locations, attention_weights)


def level_sizes(spatial_shapes, static_shapes: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """[(H_l, W_l), ...] as Python ints from an (L, 2) tensor (read back to the host) or int pairs; from
    ``static_shapes`` instead where given (the tensor is then never read)."""
    if static_shapes is not None:
        spatial_shapes = static_shapes
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def grid_sample_msda(value: torch.Tensor, sizes: Sequence[tuple[int, int]], sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor) -> torch.Tensor:
    """The computation of ``ms_deform_attn_reference`` with the level sizes as Python ints."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    if len(sizes) != num_levels:
        raise RuntimeError(f"ms_deform_attn: spatial_shapes has {len(sizes)} levels but sampling_locations "
                           f"has L = {num_levels} (shape {tuple(sampling_locations.shape)})")
    chunks = value.split([h * w for h, w in sizes], dim=1)
    # grid_sample works in [-1, 1] with align_corners=False: g = 2 * loc - 1 maps to the pixel
    # coordinate loc * size - 0.5, zero padding outside. A sample is in range only for
    # -1 - 2/size < g < 1 + 2/size, so moving NaN to -3 and clamping to [-3, 3] changes no in-range
    # sample and makes non-finite ones out of range; both have zero gradient there, as in the kernels.
    grids = torch.nan_to_num(2 * sampling_locations - 1, nan=-3.0).clamp(-3.0, 3.0)
    sampled = []
    for level, (h, w) in enumerate(sizes):
        # (N, H*W, M, D) -> (N*M, D, H, W), batch-major then head.
        v = chunks[level].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N*M, D, Lq, L, P) -> (N*M, D, Lq, L*P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (stacked * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
