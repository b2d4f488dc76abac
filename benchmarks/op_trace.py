"""Record every ATen call (op and input shapes) of the tiny models' eval forward and training step, for an
A/B check that a refactor runs the same computation: run it in two trees and compare the JSON files.

    PYTHONPATH=<tree>/packages/backbones:<tree>/packages/cuda_ops python benchmarks/op_trace.py OUT.json
"""
import json
import sys

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Rec(TorchDispatchMode):
    """Records each dispatched ATen call as 'op[input shapes]'."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.ops.append(f"{func}{shapes}")
        return out
res = {}
for name in ["unified_convnext_tiny", "unified_halo_tiny", "unified_pvt_tiny", "unified_swin_tiny", "unified_dcn_v3_tiny"]:
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=1000)
    x = torch.randn(2, 3, 224, 224)
    m.eval()
    with torch.inference_mode(), Rec() as r:
        m(x)
    res[name + "/eval"] = r.ops
    m.train()
    with Rec() as r:
        m(x).sum().backward()
    res[name + "/train"] = r.ops
json.dump(res, open(sys.argv[1], "w"))
print({k: len(v) for k, v in res.items()})
