"""Fine-tuning through timm and the one set of loading rules shared by every load path (checkpoint.py docstring):
pretrained with another num_classes / num_classes=0 / in_chans / features_only, model vs model_ema, weights-only
files and URLs, DDP / torch.compile prefixes, SHA-256 checks, non-finite weights."""

import argparse
import functools
import hashlib
import http.server
import logging
import os
import threading

import pytest
import timm
import torch

import stm_backbones
from stm_backbones.checkpoint import (
    CheckpointMismatchError,
    ChecksumError,
    NonFiniteWeightsError,
    load_checkpoint,
    load_into_dense_backbone,
)

NAME = "unified_convnext_micro"  # any input size works: small, fast images


def _randomised(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture
def source():
    return _randomised(timm.create_model(NAME))


@pytest.fixture
def ckpt(tmp_path, source):
    path = tmp_path / "unified_convnext_micro.pth"
    torch.save({"model": source.state_dict(), "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, path)
    return path


def _image(channels=3, seed=1):
    return torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(seed))


def _overlay(path):
    return dict(pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_with_other_num_classes_reinitialises_the_head(ckpt, source, caplog):
    with caplog.at_level(logging.WARNING, logger="stm_backbones"):
        model = timm.create_model(NAME, pretrained=True, num_classes=10, **_overlay(ckpt)).eval()
    assert "re-initialised" in caplog.text and "1000 classes" in caplog.text and "num_classes=10" in caplog.text
    assert model.head.out_features == 10
    with torch.no_grad():  # the trunk and pre-logits are the checkpoint's
        torch.testing.assert_close(model.forward_head(model.forward_features(_image()), pre_logits=True),
                                   source.forward_head(source.forward_features(_image()), pre_logits=True),
                                   rtol=0, atol=0)
    assert not torch.equal(model.head.weight, source.head.weight[:10])  # fresh head, not a slice


def test_pretrained_with_num_classes_0_returns_the_pre_logits(ckpt, source, caplog):
    with caplog.at_level(logging.WARNING, logger="stm_backbones"):
        model = timm.create_model(NAME, pretrained=True, num_classes=0, **_overlay(ckpt)).eval()
    assert "num_classes=0" in caplog.text
    with torch.no_grad():
        out = model(_image())
        assert out.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(out, source.forward_head(source.forward_features(_image()), pre_logits=True),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("in_chans", [1, 2])
def test_pretrained_with_other_in_chans_adapts_the_stem_as_timm_does(ckpt, source, in_chans, caplog):
    with caplog.at_level(logging.WARNING, logger="stm_backbones"):
        model = timm.create_model(NAME, pretrained=True, in_chans=in_chans, **_overlay(ckpt)).eval()
    assert "input channels" in caplog.text
    stem = source.downsample_layers[0].stem[0].weight
    # timm's adapt_input_conv: summed over RGB for one channel; RGB repeated and scaled by 3/C otherwise
    expected = stem.sum(1, keepdim=True) if in_chans == 1 else stem.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    torch.testing.assert_close(model.downsample_layers[0].stem[0].weight, expected)
    if in_chans == 1:  # a grey image through the adapted model == the same image as RGB through the source
        grey = _image(1)
        with torch.no_grad():
            torch.testing.assert_close(model(grey), source(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def test_pretrained_features_only(ckpt, source):
    features = timm.create_model(NAME, pretrained=True, features_only=True, **_overlay(ckpt)).eval()
    assert features.pretrained_cfg["architecture"] == NAME and features.default_cfg is features.pretrained_cfg
    with torch.no_grad():
        want = source.forward_intermediates(_image(), norm=True, intermediates_only=True)
        for got, expected in zip(features(_image()), want, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ model vs model_ema
@pytest.fixture
def two_sets(tmp_path):
    live, ema = _randomised(timm.create_model(NAME), 1), _randomised(timm.create_model(NAME), 2)
    path = tmp_path / "both.pth"
    torch.save({"model": live.state_dict(), "model_ema": ema.state_dict(), "args": argparse.Namespace()}, path)
    return path, live, ema


def _same_weights(model, reference):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_one_rule_for_model_and_ema_on_every_path(two_sets):
    path, live, ema = two_sets
    # default: the live weights ('model'), whatever the path
    loaded = timm.create_model(NAME)
    load_checkpoint(loaded, path)
    assert _same_weights(loaded, live)
    assert _same_weights(timm.create_model(NAME, pretrained=True, **_overlay(path)), live)
    assert _same_weights(timm.create_model(NAME, checkpoint_path=str(path)), live)
    # asked for: the EMA
    load_checkpoint(loaded, path, use_ema=True)
    assert _same_weights(loaded, ema)
    assert _same_weights(timm.create_model(NAME, pretrained=True, checkpoint_ema=True, **_overlay(path)), ema)
    assert _same_weights(timm.create_model(NAME, checkpoint_path=str(path), checkpoint_ema=True), ema)


def test_ema_only_file_loads_the_ema_and_missing_ema_is_an_error(tmp_path, source):
    torch.save({"model_ema": source.state_dict()}, tmp_path / "ema.pth")
    assert _same_weights(timm.create_model(NAME, checkpoint_path=str(tmp_path / "ema.pth")), source)
    torch.save({"model": source.state_dict()}, tmp_path / "live.pth")
    with pytest.raises(CheckpointMismatchError, match="use_ema=True.*no EMA weights"):
        load_checkpoint(timm.create_model(NAME), tmp_path / "live.pth", use_ema=True)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_everywhere(tmp_path, source, prefix):
    state = {prefix + k: v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    for model in (timm.create_model(NAME, pretrained=True, **_overlay(tmp_path / "wrapped.pth")),
                  timm.create_model(NAME, checkpoint_path=str(tmp_path / "wrapped.pth"))):
        assert _same_weights(model, source)
    direct = timm.create_model(NAME)
    direct.load_state_dict(state)
    assert _same_weights(direct, source)
    dense = stm_backbones.create_dense_backbone(NAME)
    load_into_dense_backbone(dense, tmp_path / "wrapped.pth")
    torch.testing.assert_close(dense.stages[3][0].pwconv1.weight, source.stages[3][0].pwconv1.weight)


def test_sha256_is_checked_when_given(ckpt, source):
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    for expected in (digest, digest[:10].upper()):
        model = timm.create_model(NAME)
        load_checkpoint(model, ckpt, sha256=expected)
        assert _same_weights(model, source)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ChecksumError, match=digest):
        load_checkpoint(timm.create_model(NAME), ckpt, sha256=wrong)
    with pytest.raises(ChecksumError):
        timm.create_model(NAME, pretrained=True, checkpoint_sha256=wrong[:12], **_overlay(ckpt))
    with pytest.raises(ValueError, match="hexadecimal"):
        load_checkpoint(timm.create_model(NAME), ckpt, sha256="abc")


# ------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_reported_on_load(tmp_path, source, value):
    state = source.state_dict()
    state["stages.2.3.pwconv1.weight"][0, 0] = value
    torch.save({"model": state}, tmp_path / "diverged.pth")
    paths = [
        lambda: load_checkpoint(timm.create_model(NAME), tmp_path / "diverged.pth"),
        lambda: timm.create_model(NAME, pretrained=True, **_overlay(tmp_path / "diverged.pth")),
        lambda: timm.create_model(NAME, checkpoint_path=str(tmp_path / "diverged.pth")),
        lambda: timm.create_model(NAME).load_state_dict(state),
        lambda: load_into_dense_backbone(stm_backbones.create_dense_backbone(NAME), tmp_path / "diverged.pth"),
    ]
    for load in paths:
        with pytest.raises(NonFiniteWeightsError, match=r"stages\.2\.3\.pwconv1\.weight \(1 of"):
            load()
    model = timm.create_model(NAME)
    load_checkpoint(model, tmp_path / "diverged.pth", allow_non_finite=True)  # the explicit opt-in
    assert not torch.isfinite(model.stages[2][3].pwconv1.weight).all()


# ------------------------------------------------------------------------------------ URLs
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A local HTTP server over tmp_path/www; STM_CACHE points into tmp_path."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("STM_CACHE", str(tmp_path / "cache"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_is_loaded_weights_only_cached_and_hash_checked(http_root, source, tmp_path):
    root, base = http_root
    torch.save({"model": source.state_dict(), "args": argparse.Namespace()}, root / "weights.pth")
    model = timm.create_model(NAME, pretrained=True, num_classes=5, **{"pretrained_cfg_overlay": dict(
        url=f"{base}/weights.pth")})
    assert torch.equal(model.stages[3][0].pwconv1.weight, source.stages[3][0].pwconv1.weight)
    assert (tmp_path / "cache" / "checkpoints" / "weights.pth").is_file()

    digest = hashlib.sha256((root / "weights.pth").read_bytes()).hexdigest()
    (root / f"good-{digest[:8]}.pth").write_bytes((root / "weights.pth").read_bytes())
    load_checkpoint(timm.create_model(NAME), f"{base}/good-{digest[:8]}.pth")  # torch.hub's name-<hash> convention
    wrong = "0" * 8 if digest[:8] != "0" * 8 else "1" * 8
    (root / f"bad-{wrong}.pth").write_bytes((root / "weights.pth").read_bytes())
    with pytest.raises(RuntimeError, match="hash"):
        load_checkpoint(timm.create_model(NAME), f"{base}/bad-{wrong}.pth")


def test_url_with_a_crafted_pickle_is_refused(http_root, source, tmp_path):
    root, base = http_root
    evil = _Evil()
    evil.marker = str(tmp_path / "PWNED")
    torch.save({"model": source.state_dict(), "extra": evil}, root / "evil.pth")
    with pytest.raises(RuntimeError, match="trusted=True"):
        load_checkpoint(timm.create_model(NAME), f"{base}/evil.pth")
    with pytest.raises(RuntimeError):
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(url=f"{base}/evil.pth"))
    assert not (tmp_path / "PWNED").exists()


def test_classifier_of_another_size_with_the_cfg_class_count_is_still_an_error(tmp_path):
    """timm's rule: the head is dropped only when num_classes differs from the pretrained_cfg's (1000)."""
    ten = _randomised(timm.create_model(NAME, num_classes=10))
    torch.save({"model": ten.state_dict()}, tmp_path / "ten.pth")
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight \(checkpoint \(10, 384\) vs model \(1000, 384\)"):
        timm.create_model(NAME, pretrained=True, **_overlay(tmp_path / "ten.pth"))
    model = timm.create_model(NAME, pretrained=True, num_classes=10, **_overlay(tmp_path / "ten.pth"))
    assert torch.equal(model.stages[0][0].pwconv1.weight, ten.stages[0][0].pwconv1.weight)
