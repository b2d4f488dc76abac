"""Swin's shifted windows as token gathers, and its attention bias + shift mask as one cached additive mask.

Plain form (`models/swin.py`): `torch.roll` by -shift, `window_partition` (a view and a permuted copy), the
attention, `window_reverse` (another copy) and the roll back: four full copies of the map per block, plus
the relative-position bias gathered from its table and the shift mask added to the logits on every call.

Here:

* the roll and the partition are ONE gather along the row-major token axis (`window_order`,
  `permute_tokens`), their inverses another; the gather's backward is the inverse gather, not the
  scatter-add autograd would use for `index_select`;
* bias and shift mask are summed once into the additive mask of `F.scaled_dot_product_attention`
  (`attention_bias`), and without autograd through the table that mask is cached on the attention module
  while the table, the index and the mask are unchanged (`inference_mask`).
"""

from __future__ import annotations

import torch

from .. import fast_paths


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
    if fast_paths.is_tracing():
        return x.index_select(1, order)  # traced graphs (fvcore, export) see a plain aten op
    return _PermuteTokens.apply(x, order, inverse)


def attention_bias(attn, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(nW or 1, heads, N, N): the relative-position bias of `attn` (a `WindowAttention`) plus the (nW, N, N)
    shift mask, if any."""
    bias = attn.relative_position_bias().unsqueeze(0)
    return bias if mask is None else bias + mask.unsqueeze(1)


def inference_mask(attn, mask: torch.Tensor | None, windows: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive SDPA mask for `windows` windows, (windows or 1, heads, N, N), cached on `attn` while the
    table, index and shift mask are unchanged (keyed on their storage and version counters)."""
    table, index = attn.relative_position_bias_table, attn.relative_position_index
    cacheable = not (fast_paths.compiling() or fast_paths.is_tracing()
                     or any(t.is_inference() for t in (table, index, mask) if t is not None))  # no versions
    key = None
    if cacheable:
        key = (windows, dtype, table.device, table.data_ptr(), table._version, index.data_ptr(), index._version,
               None if mask is None else (mask.data_ptr(), mask._version, mask.shape))
        if attn._bias_cache is not None and attn._bias_cache[0] == key:
            return attn._bias_cache[1]
    bias = attention_bias(attn, mask).to(dtype)
    if bias.shape[0] > 1:  # one mask per window: materialise it over the batch (SDPA broadcasts dims of size 1)
        count, tokens = bias.shape[0], bias.shape[-1]
        bias = bias.expand(windows // count, count, attn.num_heads, tokens, tokens)
        bias = bias.reshape(windows, attn.num_heads, tokens, tokens)
    if cacheable:
        attn._bias_cache = (key, bias)
    return bias
