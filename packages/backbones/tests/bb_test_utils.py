"""Assertions and naive formulas shared by the backbone tests (importable: conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import math

import torch


def assert_close_to_scale(actual, expected, tol=1e-5, msg=""):
    """Float32 agreement to `tol` relative to the tensor's scale (gradients sum many terms: elements near
    zero carry absolute rounding errors of the size of the large ones)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=msg)


def grads_of(module, x, fn):
    """(fn(module, x), gradients of out.square().sum() w.r.t. the input and every parameter)."""
    x = x.detach().clone().requires_grad_()
    out = fn(module, x)
    out.square().sum().backward()
    grads = {"input": x.grad, **{n: p.grad.clone() for n, p in module.named_parameters()}}
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_grads_close(got, want, rtol=1e-5):
    """Gradient dicts agree relative to each tensor's largest entry."""
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-12)
        torch.testing.assert_close(got[name] / scale, want[name] / scale, rtol=rtol, atol=rtol, msg=name)


def check_classifier_against_straightforward(model, image, use_straightforward, monkeypatch):
    """A classifier's logits (eval and train mode) and eval-mode gradients with its blocks' fast paths
    agree with the same model whose block forward is patched back to the straightforward formulation."""
    # eval first (training steps update the BatchNorm statistics); gradients in eval mode: behind a
    # train-mode BatchNorm (conv_head) the head-side gradients are small differences of large numbers,
    # float32 noise of ~1e-4 for any change of summation order
    tol = dict(rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        fast = model(image)
    fast_grads = grads_of(model, image, lambda m, t: m(t))[1]
    with monkeypatch.context() as patch:
        use_straightforward(patch)
        with torch.no_grad():
            want = model(image)
        want_grads = grads_of(model, image, lambda m, t: m(t))[1]
        want_train = model.train()(image)
    fast_train = model(image)
    torch.testing.assert_close(fast, want, **tol)
    torch.testing.assert_close(fast_train, want_train, **tol)
    assert_grads_close(fast_grads, want_grads)


def check_training_step_against(block, x, reference):
    """Output and input/parameter gradients of a training-mode block equal those of `reference(block, x)`
    (the straightforward formulation), for one random output gradient."""
    x = x.detach().clone().requires_grad_()
    grad = torch.randn_like(x)
    out = block(x)
    out.backward(grad)
    fast = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in block.named_parameters()}}
    x.grad = None
    block.zero_grad()
    expected = reference(block, x)
    expected.backward(grad)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    slow = {"x": x.grad, **{n: p.grad for n, p in block.named_parameters()}}
    assert fast.keys() == slow.keys()
    for name in fast:
        assert_close_to_scale(fast[name], slow[name], msg=name)


def check_models_match(name, reference, image_size, tol):
    """A classifier (`image_size` square) and a dense backbone (96x160) give the same outputs with the
    blocks' fast paths as `reference(model, image)` (e.g. the plain formulation), to `tol`."""
    import timm

    import stm_backbones

    model = timm.create_model(name, num_classes=7).eval()
    dense = stm_backbones.create_dense_backbone(name).eval()
    image, dense_image = torch.randn(2, 3, image_size, image_size), torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(image), reference(model, image), atol=tol, rtol=tol)
        for a, b in zip(dense(dense_image), reference(dense, dense_image)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def check_drop_path_samples(block, x, reference, seed):
    """A training-mode block with a DropPath draws the same samples as `reference(block, x)` from the same
    seed; returns the block's output."""
    from timm.layers import DropPath

    assert isinstance(block.drop_path, DropPath)
    torch.manual_seed(seed)
    out = block(x)
    torch.manual_seed(seed)
    torch.testing.assert_close(out, reference(block, x), atol=1e-5, rtol=1e-5)
    return out


def traced_op_kinds(block, x):
    """The node kinds of the block's torch.jit.trace graph (as fvcore's FLOP counter sees it), after checking
    that the traced graph gives the block's output."""
    with torch.no_grad():
        traced = torch.jit.trace(block, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), block(x), atol=1e-5, rtol=1e-5)
    return {node.kind() for node in traced.inlined_graph.nodes()}


# ----------------------------------------------------------------------------------- naive formulas
def naive_ln(t, norm, eps=1e-5):
    """LayerNorm over the last axis by the textbook formula (biased variance, eps inside the sqrt)."""
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * norm.weight + norm.bias


def naive_gelu(t):
    """Exact (erf) GELU."""
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def linear(t, layer):
    """`layer` (nn.Linear) applied by its formula."""
    return t @ layer.weight.T + layer.bias
