"""Behaviour every registered model shares: features, dense variant, compile, checkpointing, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import stm_backbones

MANIFEST = json.loads((Path(__file__).resolve().parents[3] / "tests" / "data" / "state_dict_manifest.json").read_text())
PRIMARY = sorted(n for n in MANIFEST if n.startswith("unified_") and "_v2_" not in n)  # the study's 21 models
# Every registered mixer family (a new one gets these tests without an edit here), by its smallest model.
FAMILIES = stm_backbones.list_families()
MICRO = [family.smallest for family in FAMILIES]


def test_primary_model_list():
    assert len(PRIMARY) == 21


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", PRIMARY)
def test_features_only_and_dense_shapes(name):
    """Classification features at 224 and the dense variant at a non-square, non-224 size."""
    with torch.no_grad():
        features = timm.create_model(name, features_only=True).eval()
        outs = features(torch.randn(1, 3, 224, 224))
        dims = MANIFEST[name]
        assert [o.shape[-1] for o in outs] == [56, 28, 14, 7]
        assert features.feature_info.reduction() == [4, 8, 16, 32]
        assert [o.shape[1] for o in outs] == features.feature_info.channels()

        dense = stm_backbones.create_dense_backbone(name).eval()
        # a second, non-square size for every model; a larger one only where it is cheap
        sizes = ((96, 160), (256, 192)) if name.endswith(("_micro", "_tiny")) else ((96, 160),)
        for height, width in sizes:
            maps = dense(torch.randn(1, 3, height, width))
            assert [tuple(m.shape[-2:]) for m in maps] == [(height // s, width // s) for s in (4, 8, 16, 32)]
            assert [m.shape[1] for m in maps] == features.feature_info.channels()
            assert all(torch.isfinite(m).all() for m in maps)
        assert dims  # manifest entry exists for every primary model


@pytest.mark.parametrize("name", MICRO)
def test_dense_out_indices_subset(name):
    dense = stm_backbones.create_dense_backbone(name, out_indices=(1, 3)).eval()
    with torch.no_grad():
        maps = dense(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 12), (2, 3)]
    assert sorted(k for k in dense.state_dict() if "out_norm" in k) == [
        "out_norm_1.bias", "out_norm_1.weight", "out_norm_3.bias", "out_norm_3.weight"]


def _small_model(name):
    """A micro model on a small input (compile and checkpointing tests are about the mechanics): the classifier
    built for 64x64 when the family takes that size (its `input_size_error`), else the dense trunk at 64x96
    (e.g. the halo classifier needs 224-multiples)."""
    family, _ = stm_backbones.family_of(name)
    if family.block_type.input_size_error(64, 64, (64, 64), False) is not None:
        return stm_backbones.create_dense_backbone(name, drop_path_rate=0.0), torch.randn(2, 3, 64, 96)
    return timm.create_model(name, num_classes=10, img_size=64), torch.randn(2, 3, 64, 64)


def _flat(out):
    return torch.cat([o.flatten() for o in out]) if isinstance(out, (list, tuple)) else out.flatten()


@pytest.mark.parametrize("name", MICRO)
def test_torch_compile_matches_eager(name):
    model, image = _small_model(name)
    model.eval()
    with torch.no_grad():
        eager = _flat(model(image))
        compiled = _flat(torch.compile(model)(image))
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MICRO)
def test_grad_checkpointing_gives_same_gradients(name):
    model, image = _small_model(name)
    model.train()
    for module in model.modules():  # BN batch statistics are fine, but no stochastic depth
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()

    def grads():
        model.zero_grad()
        _flat(model(image)).square().sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    torch.testing.assert_close(checkpointed, plain, atol=1e-5, rtol=1e-4)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="unknown model 'unified_swim_tiny'.*unified_swin_tiny"):
        stm_backbones.create_model("unified_swim_tiny")


@pytest.mark.parametrize("name", ["unified_swin_micro", "unified_pvt_micro"])
def test_fixed_resolution_classifier_rejects_other_sizes(name):
    model = timm.create_model(name)
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 256, 256))


def test_dense_backbone_rejects_sides_not_multiple_of_32():
    dense = stm_backbones.create_dense_backbone("unified_convnext_micro")
    with pytest.raises(ValueError, match="multiples of 32"):
        dense(torch.randn(1, 3, 100, 64))


def test_wrong_rank_input_is_a_clear_error():
    model = timm.create_model("unified_convnext_micro")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 64, 64))


def test_timm_standard_kwargs():
    model = timm.create_model("unified_convnext_micro", num_classes=7, drop_path_rate=0.3, layer_scale_init_value=0.5,
                              in_chans=1)
    assert model.head.out_features == 7
    assert torch.all(model.stages[0][0].gamma_1 == 0.5)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 7)
    no_scale = timm.create_model("unified_convnext_micro", layer_scale_init_value=0)
    assert not any("gamma" in k for k in no_scale.state_dict())
    rates = [b.drop_path.drop_prob for s in model.stages for b in s if hasattr(b.drop_path, "drop_prob")]
    assert max(rates) == pytest.approx(0.3) and len(rates) == sum(len(s) for s in model.stages) - 1


def test_backbones_import_without_cuda_ops():
    """stm_backbones works without stm_cuda_ops' compiled extension: DCNv3 falls back to the op's pure-PyTorch
    reference with one warning."""
    code = (
        "import sys, warnings\n"
        "sys.modules['stm_cuda_ops._C'] = None  # as if the extension were not built\n"
        "import torch, timm, stm_backbones\n"
        "m = timm.create_model('unified_dcn_v3_micro', num_classes=3).eval()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    with torch.no_grad():\n"
        "        m(torch.randn(1, 3, 64, 64)); m(torch.randn(1, 3, 64, 64))\n"
        "hits = [w for w in caught if 'stm_cuda_ops' in str(w.message)]\n"
        "print(len(hits))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "1"
