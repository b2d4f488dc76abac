"""Old vs new outputs, bitwise, for an A/B check that a refactor moved no logit: eval logits at 224 of every
registered model, dense maps at 96x160 and train outputs + all gradients of the micro and official models, with
deterministic weights derived from the parameter names. Run `save` in the old tree and `compare` in the new one:

    PYTHONPATH=<old>/packages/backbones:<old>/packages/cuda_ops python benchmarks/ab_outputs.py save old.pt
    python benchmarks/ab_outputs.py compare old.pt
"""
import sys
import zlib

import timm
import torch

import stm_backbones

torch.set_num_threads(2)
mode, path = sys.argv[1], sys.argv[2]

def fill(model):
    with torch.no_grad():
        for k, v in model.named_parameters():
            if v.is_floating_point():
                g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
                v.copy_(torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype) * 0.05 + (1.0 if k.endswith(("norm.weight", "norm1.weight", "norm2.weight")) else 0.0))
    return model

results = {}
names = [n for n in stm_backbones.list_models() if not n.startswith("unified_pool")]
for name in names:
    torch.manual_seed(0)
    m = fill(timm.create_model(name, layer_scale_init_value=0.5)).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        results[f"{name}/eval"] = m(x)
    if name.endswith("_micro") or name.startswith("official"):
        d = fill(stm_backbones.create_dense_backbone(name, layer_scale_init_value=0.5)).eval()
        xd = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            for i, f in enumerate(d(xd)):
                results[f"{name}/dense{i}"] = f
        m.train()
        torch.manual_seed(3)
        out = m(x)
        out.square().sum().backward()
        results[f"{name}/train"] = out.detach()
        for k, p in m.named_parameters():
            if p.grad is not None:
                results[f"{name}/grad/{k}"] = p.grad
    print(name, flush=True)
if mode == "save":
    torch.save(results, path)
else:
    old = torch.load(path, weights_only=True)
    bad = [k for k in old if k not in results or not torch.equal(old[k], results[k])]
    print("outputs with NaN:", sum(bool(v.isnan().any()) for v in results.values()))
    print(f"compared {len(old)} tensors; different: {len(bad)}", bad[:10])
