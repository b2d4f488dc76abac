"""stm_cuda_ops: multi-scale deformable attention (the DCNv3 / Deformable-DETR sampling op).

``ms_deform_attn`` dispatches to compiled CPU/CUDA kernels registered with PyTorch as
``torch.ops.stm_cuda_ops.ms_deform_attn_forward`` / ``ms_deform_attn_backward`` (autograd, fake
tensors for torch.compile/torch.export and float32 autocast included). Without the compiled
extension it falls back to ``ms_deform_attn_reference`` (pure PyTorch) after a one-time warning.
"""

from ._ops import build_info, has_compiled_op, ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = ["build_info", "has_compiled_op", "ms_deform_attn", "ms_deform_attn_reference"]
__version__ = "0.1.0"
