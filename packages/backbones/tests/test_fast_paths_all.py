"""Fast path vs plain formulation for every registered mixer family (found from the registry, not a list).

In float64 the two paths differ only by the order of float operations, so outputs and gradients must agree to
a few ulps of float64 (tolerance 1e-9 relative to the output's scale, some 10^6 times the rounding error of these
small models): a fast kernel that computes another function fails by orders of magnitude more. Layer scales
are 0.5 and every parameter is perturbed, so each branch (and DCNv3's sampling offsets) matters.
"""

from __future__ import annotations

import pytest
import timm
import torch

import stm_backbones
from stm_backbones import fast_paths

FAMILIES = stm_backbones.list_families()
DENSE_SIZE = (64, 96)
CLASSIFIER_SIZE = 64


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _variants(family):
    """(label, model, input) pairs: the classifier where the family takes a small input, and the dense trunk."""
    name = family.smallest
    out = []
    rule = getattr(family.block_type, "input_size_error", None)
    size = (CLASSIFIER_SIZE, CLASSIFIER_SIZE)
    if rule is None or rule(*size, size, False) is None:
        model = timm.create_model(name, num_classes=7, img_size=CLASSIFIER_SIZE, layer_scale_init_value=0.5)
        out.append(("classifier", model, torch.randn(2, 3, *size, dtype=torch.float64)))
    dense = stm_backbones.create_dense_backbone(name, drop_path_rate=0.0, layer_scale_init_value=0.5)
    out.append(("dense", dense, torch.randn(2, 3, *DENSE_SIZE, dtype=torch.float64)))
    return [(label, _perturbed(model.double()), image) for label, model, image in out]


def _flat(out) -> torch.Tensor:
    return torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out.flatten()


def _run(model, image, fast: bool, train: bool):
    model.train(train)
    model.zero_grad(set_to_none=True)
    with fast_paths.fast_paths(fast), torch.set_grad_enabled(train):
        out = _flat(model(image))
        if not train:
            return out, None
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype)
        (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float | None = None) -> None:
    """Equal up to 1e-9 of `scale` (default: the largest |expected|); a gradient that is itself only rounding
    noise (e.g. a bias whose output is normalised away) is compared at the scale of the model's gradients."""
    scale = scale if scale is not None else expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_fast_path_equals_plain_formulation(family):
    for label, model, image in _variants(family):
        for train in (False, True):
            plain, plain_grads = _run(model, image, fast=False, train=train)
            fast, fast_grads = _run(model, image, fast=True, train=train)
            _close(fast, plain, f"{family.name} {label} {'train' if train else 'eval'} output")
            if train:
                assert fast_grads.keys() == plain_grads.keys()
                grad_scale = max(g.abs().max().item() for g in plain_grads.values())
                for key in plain_grads:
                    _close(fast_grads[key], plain_grads[key], f"{family.name} {label} grad {key}", grad_scale)


def test_switch_function_context_and_environment(monkeypatch):
    assert fast_paths.enabled()
    with fast_paths.fast_paths(False):
        assert not fast_paths.enabled() and not fast_paths.eager_kernels()
        with fast_paths.fast_paths(True):
            assert fast_paths.enabled()
        assert not fast_paths.enabled()
    assert fast_paths.enabled()
    previous = fast_paths.set_fast_paths(False)
    try:
        assert previous and not fast_paths.enabled()
    finally:
        fast_paths.set_fast_paths(True)
    monkeypatch.setenv(fast_paths.ENV_VAR, "0")
    assert fast_paths._from_env() is False
    monkeypatch.setenv(fast_paths.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="STM_FAST_PATHS"):
        fast_paths._from_env()


def test_jit_trace_sees_the_plain_formulation():
    """TorchScript tracing (fvcore's FLOP counter) takes the plain formulation: the switch is off inside it."""
    seen = []

    def hook():
        seen.append(fast_paths.enabled())
        return True

    class Probe(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            hook()
            return self.model(x)[-1]

    probe = Probe(stm_backbones.create_dense_backbone(FAMILIES[0].smallest)).eval()
    with torch.no_grad():
        torch.jit.trace(probe, torch.randn(1, 3, *DENSE_SIZE), check_trace=False)
    assert seen == [False]  # inside the trace the switch reports the plain path
    assert fast_paths.enabled()
