"""Export to ONNX (run in onnxruntime) and to torch.export `.pt2` (run in PyTorch): parity with eager outputs
(1e-4) for every family's micro model, as classifier and as dense backbone at a non-square size, with the
dynamic axes exercised at a batch size and (where dynamic) an image size other than the example's."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import stm_backbones  # noqa: E402
from stm_backbones import export as stm_export  # noqa: E402

# The study's mixers, from the registry (the sizes and expectations below are per family).
FAMILIES = [family.name for family in stm_backbones.list_families(study=True)]
TOL = 1e-4


def _outputs(out) -> list[torch.Tensor]:
    return [o.detach() for o in out] if isinstance(out, (list, tuple)) else [out.detach()]


def _assert_parity(got, want, what):
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        g = torch.as_tensor(np.asarray(g)) if not isinstance(g, torch.Tensor) else g
        assert g.shape == w.shape, what
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=TOL, atol=TOL * scale, msg=what)


def _check(model, example, checks, dynamic_hw, tmp_path):
    """Export once, write both formats, and compare each on every input in `checks` with eager."""
    program, dynamic_hw, notes = stm_export.program_with_fallback(model, example, dynamic_hw)
    outputs = len(model.out_indices) if getattr(model, "dense", False) else 1
    stm_export.write_program(program, "pt2", tmp_path / "m.pt2", outputs)
    stm_export.write_program(program, "onnx", tmp_path / "m.onnx", outputs)
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for x in checks:
        if not dynamic_hw and x.shape[2:] != example.shape[2:]:
            continue
        with torch.no_grad():
            want = _outputs(model(x))
            _assert_parity(_outputs(loaded(x)), want, f"pt2 {tuple(x.shape)}")
        _assert_parity(session.run(None, {"x": x.numpy()}), want, f"onnx {tuple(x.shape)}")
    return dynamic_hw, notes


def _inputs(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_exports_with_parity(family, tmp_path):
    name = stm_backbones.get_family(family).smallest
    torch.manual_seed(0)
    size = {"halo": 224}.get(family, 64)  # Halo's classifier takes 224-multiples; the others are built for 64
    # two blocks per stage, as in the dense test below: what is exported per block does not depend on the depth
    kwargs = {"img_size": (size, size)} if family in ("swin", "pvt") else {}
    model = timm.create_model(name, depths=(2, 2, 2, 2), **kwargs).eval()
    example, *checks = _inputs((2, 3, size, size), (3, 3, size, size), (1, 3, 96, 64))
    dynamic_hw, _ = _check(model, example, checks, stm_export.dynamic_hw_possible(name, dense=False), tmp_path)
    assert dynamic_hw == (family == "convnext")  # the classifiers of the other families specialise on the size


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_backbone_exports_with_parity_at_a_non_square_size(family, tmp_path):
    """The micro dense trunk with two blocks per stage (a shifted and an unshifted Swin block; the export of a
    block does not depend on how many follow it, and the test time does)."""
    name = stm_backbones.get_family(family).smallest
    torch.manual_seed(0)
    model = stm_backbones.create_dense_backbone(name, depths=(2, 2, 2, 2)).eval()
    example, *checks = _inputs((2, 3, 64, 96), (3, 3, 64, 96), (1, 3, 96, 128))
    dynamic_hw, _ = _check(model, example, checks, stm_export.dynamic_hw_possible(name, dense=True), tmp_path)
    assert dynamic_hw == (family in ("convnext", "pvt"))


def test_command_line_exports_a_checkpoint(tmp_path, capsys):
    import timm

    torch.manual_seed(0)
    source = timm.create_model("unified_pvt_v2_micro", num_classes=7).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.05)
    torch.save({"model": source.state_dict()}, tmp_path / "ckpt.pth")
    out = tmp_path / "out" / "pvt.onnx"
    code = stm_export.main(["unified_pvt_v2_micro", "--checkpoint", str(tmp_path / "ckpt.pth"), "--num-classes", "7",
                            "--format", "onnx", "--output", str(out), "--img-size", "64"])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    x = _inputs((3, 3, 64, 64))[0]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        _assert_parity(session.run(None, {"x": x.numpy()}), [source(x)], "cli onnx")


@pytest.mark.parametrize("argv, message", [
    (["unified_swim_micro", "--format", "onnx", "--output", "x.onnx"], "unknown model 'unified_swim_micro'"),
    (["unified_halo_micro", "--format", "pt2", "--output", "x.pt2", "--img-size", "100"], "multiple of the block"),
    (["unified_convnext_micro", "--format", "onnx", "--output", "x.onnx", "--checkpoint", "missing.pth"],
     "checkpoint not found"),
])
def test_command_line_errors_are_named(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stm_export.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written
