"""stm_cuda_ops: multi-scale deformable attention (the DCNv3 / Deformable-DETR sampling op).

``ms_deform_attn`` dispatches to compiled CPU/CUDA kernels registered with PyTorch as
``torch.ops.stm_cuda_ops.ms_deform_attn_forward`` / ``ms_deform_attn_backward`` (autograd, fake
tensors for torch.compile/torch.export and float32 autocast included). Without the compiled
extension it falls back to ``ms_deform_attn_reference`` (pure PyTorch) after a one-time warning;
``use_reference()`` selects the reference on purpose (export to ONNX, tests). The package imports as
pure Python when the extension is not built, so other packages can depend on it unconditionally.
"""

from ._ops import BUILD_COMMAND, build_info, has_compiled_op, ms_deform_attn, use_reference
from .reference import check_tensor_args, ms_deform_attn_reference

__all__ = ["BUILD_COMMAND", "build_info", "check_tensor_args", "has_compiled_op", "ms_deform_attn",
           "ms_deform_attn_reference", "use_reference"]
__version__ = "0.1.0"
