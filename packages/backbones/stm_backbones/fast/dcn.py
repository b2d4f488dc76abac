"""DCNv3's deformable sampling with the padding and the location transform folded into one GEMM.

Replaces the plain `DeformableAttention.forward` / `DCNv3Block.forward` of `models/dcn_v3.py`, which follow
the reference: zero-pad the projected value map by `pad` pixels, compute the sampling locations
`ref + (grid + offsets)·scaler / (Wp, Hp)` in the padded frame with a linear layer and four element-wise
passes, take a separate linear layer and ATen's softmax for the attention weights, then scale and add the
two residual branches. Faster here, for the same function up to float rounding:

* no padding: sampling the padded map at padded pixel X equals sampling the unpadded map at X − pad
  (bilinear, zeros outside, in both the compiled op and grid_sample), so the locations are expressed in
  the unpadded frame and the value map is used as it is (no padded copy of the largest tensor);
* the affine location transform is folded into the offsets projection: one GEMM with weight
  W·scaler/(W, H) and a per-(query, head, point) bias table replace linear + 4 element-wise passes;
* offsets and attention logits come from one GEMM; the softmax over the 9 points uses
  `fast.softmax.softmax_lastdim` (ATen's kernel is slow for such short rows);
* the residual branches use `fast.residual.linear_branch` / `fast.mlp.mlp_branch` (γ folded into
  output_proj / fc2 where that is cheaper, the residual as the GEMM accumulator, the MLP in row chunks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import fast_paths, ops
from ..layers import SizeCache
from .autocast import reduced_autocast_dtype
from .mlp import mlp_branch
from .residual import linear_branch
from .softmax import softmax_lastdim

__all__ = ["attention_forward", "block_forward", "made_in_inference_mode", "sample"]

_LEVEL_TENSORS = SizeCache()


def made_in_inference_mode() -> bool:
    """Part of the cache keys: tensors made under torch.inference_mode() must not reach autograd later.
    Dynamo cannot trace the query (a graph break); compiled code never runs in inference mode here."""
    return False if fast_paths.compiling() else torch.is_inference_mode_enabled()


def _level_tensors(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """spatial_shapes [[height, width]] and level_start_index [0] (int64) of a one-level map."""
    return _LEVEL_TENSORS.get((height, width, device, made_in_inference_mode()), lambda: (
        torch.tensor([[height, width]], dtype=torch.int64, device=device),
        torch.zeros(1, dtype=torch.int64, device=device)))


def block_forward(block, inputs):
    """`DCNv3Block.forward`: y + γ1·attn(LN(y)), then y + γ2·MLP(LN(y)) on y = x channels-last.

    MetaArch's maps are channels_last in memory, so the permutes here are free views.
    """
    x, stage_inputs = inputs
    y = x.permute(0, 2, 3, 1)
    attn, mlp = block.attn, block.mlp
    sampled = sample(attn, block.norm1(y), stage_inputs).view(y.shape)
    y = linear_branch(y, sampled, attn.output_proj.weight, attn.output_proj.bias, block.gamma1, block.drop_path)
    # y is this block's own fresh tensor: the no-grad path may accumulate into it
    y = mlp_branch(y, block.norm2(y), mlp.fc1, mlp.fc2, block.gamma2, block.drop_path, inplace=True, act=mlp.act)
    return y.permute(0, 3, 1, 2), stage_inputs


def attention_forward(attn, u: torch.Tensor, stage_inputs) -> torch.Tensor:
    """`DeformableAttention.forward`: (B, H, W, C) -> (B, H, W, C)."""
    return attn.output_proj(sample(attn, u, stage_inputs)).view(u.shape)


def sample(attn, u: torch.Tensor, stage_inputs) -> torch.Tensor:
    """The deformable sampling of `attn` (a `DeformableAttention`) before `output_proj`: (B, H, W, C) ->
    (B, H·W, C), in the folded form described in the module docstring."""
    reference_points = stage_inputs[0]
    batch, height, width, channels = u.shape
    queries = height * width
    heads, points, pad = attn.num_heads, attn.points, attn.pad
    rows = heads * points  # (head, point) pairs, levels == 1
    low = reduced_autocast_dtype(u.device.type)
    if low is not None and fast_paths.eager_kernels():
        u = u.to(low)  # what autocast gives the conv and value_proj, cast once instead of twice

    # offsets and weights from the depth-wise conv branch: conv on the channels-last view, LN, GELU
    conv, norm = attn.dw_conv[0], attn.dw_conv[1]
    branch = norm(conv(u.permute(0, 3, 1, 2)))
    if torch.is_grad_enabled() and branch.requires_grad or not fast_paths.eager_kernels():
        branch = F.gelu(branch)
    else:
        branch = torch.ops.aten.gelu_(branch)
    branch = branch.reshape(batch * queries, channels)

    # location = base(query) + const(head, point) + branch @ w_loc.T, in the unpadded normalised frame
    weight = attn.sampling_offsets.weight
    factor = torch.tensor([attn.offsets_scaler / width, attn.offsets_scaler / height], dtype=weight.dtype,
                          device=u.device)
    w_loc = (weight.view(rows, 2, channels) * factor[:, None]).view(2 * rows, channels)
    grid = attn.grid_on(u.device).view(rows, 2)
    const = (grid + attn.sampling_offsets.bias.view(rows, 2)) * factor  # (rows, 2)
    ref_dtype = torch.promote_types(reference_points.dtype, weight.dtype)
    padded = torch.tensor([width + 2 * pad, height + 2 * pad], dtype=ref_dtype, device=u.device)
    base = (reference_points.reshape(queries, 2).to(ref_dtype) * padded - pad) / (padded - 2 * pad)  # (x+.5)/W
    table = (base[:, None, :] + const[None]).reshape(queries, 2 * rows)

    projected = torch.mm(branch, torch.cat([w_loc, attn.attention_weights.weight]).t())
    loc, logits = projected.split([2 * rows, rows], dim=-1)
    locations = (loc.view(batch, queries, 2 * rows) + table).view(batch, queries, heads, 1, points, 2)
    weights = softmax_lastdim((logits + attn.attention_weights.bias).view(batch, queries, heads, points))
    weights = weights.view(batch, queries, heads, 1, points)

    value = attn.value_proj(u).reshape(batch, queries, heads, attn.head_dim)
    spatial_shapes, level_start_index = _level_tensors(height, width, u.device)
    return ops.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, attn.im2col_step,
                              static_shapes=[(height, width)])
