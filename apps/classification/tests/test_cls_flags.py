"""Model flags of main.py (--drop_path, --pretrained/--pretrained_path, --grad_checkpointing, --model_kwargs,
--head_init_scale), the eval transform taken from the model's pretrained_cfg, no dead flags, and a --help that
does not import torch."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cls_test_utils import APP_DIR, FAST_ARGS, MAIN_PY, NO_AUG_ARGS, subprocess_env

import stm_backbones  # noqa: F401  (registers the unified models)
from stm_cls.config import parse_model_kwarg
from stm_cls.datasets import build_transform, eval_transform_config
from stm_cls.models import ModelConfigError, create_model, max_drop_path_rate

MICRO = "unified_convnext_micro"

# The study's per-size maximum stochastic-depth rates, copied from the study's model table (the oracle;
# the factories in packages/backbones hold their own copy).
STUDY_DROP_PATH = {
    "unified_halo_micro": 0.0, "unified_halo_tiny": 0.2, "unified_halo_small": 0.3, "unified_halo_base": 0.5,
    "unified_pvt_micro": 0.0, "unified_pvt_tiny": 0.1, "unified_pvt_small": 0.3, "unified_pvt_base": 0.5,
    "unified_swin_micro": 0.0, "unified_swin_tiny": 0.2, "unified_swin_small": 0.3, "unified_swin_base": 0.5,
    "unified_convnext_micro": 0.0, "unified_convnext_tiny": 0.1, "unified_convnext_small": 0.4,
    "unified_convnext_base": 0.5,
    "unified_dcn_v3_micro": 0.0, "unified_dcn_v3_tiny": 0.1, "unified_dcn_v3_small": 0.3, "unified_dcn_v3_base": 0.5,
}


@pytest.fixture(scope="module")
def parser():
    import importlib.util

    spec = importlib.util.spec_from_file_location("stm_cls_main_flags", MAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_args(parser, *extra) -> argparse.Namespace:
    args = parser.parse_args(["--model", MICRO, "--input_size", "32", "--nb_classes", "5", *map(str, extra)])
    return args


def drop_probs(model) -> list[float]:
    """Stochastic-depth probability of every block, in block order (Identity = 0)."""
    probs = []
    for stage in model.stages:
        for block in stage:
            probs.append(float(getattr(block.drop_path, "drop_prob", 0.0)))
    return probs


# ------------------------------------------------------------------------------------------- --help
def test_help_does_not_import_torch():
    """Building the parser (what --help needs) must not import torch or timm: they take ~20 s to import on a
    busy machine. Checked by module presence, not by timing."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(MAIN_PY)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "m.get_args_parser().format_help()\n"
            "print(sorted(k for k in ('torch', 'timm', 'numpy', 'PIL', 'stm_backbones') if k in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
    helped = subprocess.run([sys.executable, str(MAIN_PY), "--help"], capture_output=True, text=True, timeout=120,
                            env=subprocess_env())
    assert helped.returncode == 0
    for flag in ("--drop_path", "--pretrained_path", "--grad_checkpointing", "--model_kwargs", "--eval_interpolation"):
        assert flag in helped.stdout


# ------------------------------------------------------------------------------------------- dead flags
def _source_without_parser() -> str:
    texts = [p.read_text() for p in sorted((APP_DIR / "stm_cls").glob("*.py"))]
    main_text = MAIN_PY.read_text()
    texts.append(main_text[main_text.index("def parse_args"):])  # main.py after the parser definition
    return "\n".join(texts)


def test_every_flag_is_used(parser):
    """No accepted-but-ignored flags: every option's dest is read somewhere in the app (args.<dest>,
    getattr(args, "<dest>") or a quoted name in a table of flags). --local_rank is accepted only because
    torch.distributed.launch passes it (documented in its help)."""
    source = _source_without_parser()
    unused = []
    for action in parser.get_args_parser()._actions:
        dest = action.dest
        if dest in ("help", "local_rank"):
            continue
        if not re.search(rf"args\.{dest}\b|[\"']{dest}[\"']", source):
            unused.append(dest)
    assert not unused, f"flags accepted but never read: {unused}"


@pytest.mark.parametrize("flag", ["--eval_data_path", "--resplit", "--data_set"])
def test_removed_dead_flags_are_rejected(parser, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parser.get_args_parser().parse_args([flag, "x"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- --drop_path
@pytest.mark.parametrize("name", ["unified_halo_tiny", "unified_pvt_tiny", "unified_swin_tiny", "unified_convnext_tiny",
                                  "unified_dcn_v3_tiny", "unified_convnext_small", MICRO])
def test_drop_path_default_is_the_study_rate(parser, name):
    args = parser.get_args_parser().parse_args(["--model", name, "--nb_classes", "10"])
    assert args.drop_path is None
    torch.manual_seed(0)
    model = create_model(args)
    probs = drop_probs(model)
    expected = torch.linspace(0, STUDY_DROP_PATH[name], len(probs)).tolist()
    assert probs == pytest.approx(expected, abs=1e-7)
    assert max_drop_path_rate(model) == pytest.approx(STUDY_DROP_PATH[name], abs=1e-7)


def test_drop_path_flag_sets_linear_rates(parser):
    model = create_model(model_args(parser.get_args_parser(), "--drop_path", "0.3"))
    probs = drop_probs(model)
    assert probs == pytest.approx(torch.linspace(0, 0.3, len(probs)).tolist(), abs=1e-7)
    with pytest.raises(ModelConfigError, match=r"--drop_path must be in \[0, 1\)"):
        create_model(model_args(parser.get_args_parser(), "--drop_path", "1.5"))


# ------------------------------------------------------------------------------------------- --model_kwargs
def test_model_kwargs_parsing():
    assert parse_model_kwarg("depths=(1,1,2,1)") == ("depths", (1, 1, 2, 1))
    assert parse_model_kwarg("drop_path_rate=0.05") == ("drop_path_rate", 0.05)
    assert parse_model_kwarg("global_pool=avg") == ("global_pool", "avg")  # bare word: a string
    assert parse_model_kwarg("x='a b'") == ("x", "a b")
    assert parse_model_kwarg("flag=None") == ("flag", None)
    for bad, reason in (("depths=[1,1", "not a Python literal"), ("novalue", "expected key=value"),
                        ("1x=2", "expected key=value"), ("x=a b", "not a Python literal")):
        with pytest.raises(argparse.ArgumentTypeError, match=reason):
            parse_model_kwarg(bad)


def test_model_kwargs_reach_the_constructor(parser):
    args = model_args(parser.get_args_parser(), "--model_kwargs", "depths=(1,1,2,1)", "dims=(8,16,24,32)")
    assert dict(args.model_kwargs) == {"depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32)}
    model = create_model(args)
    assert [len(s) for s in model.stages] == [1, 1, 2, 1]
    assert model.dims == (8, 16, 24, 32)
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_model_kwargs_errors(parser, tiny_dataset, tmp_path, capsys):
    # Bad syntax: argparse's error, exit 2, naming the value.
    with pytest.raises(SystemExit) as info:
        parser.get_args_parser().parse_args(["--model_kwargs", "depths=[1,1"])
    assert info.value.code == 2 and "not a Python literal" in capsys.readouterr().err
    # An unknown key is refused by name (the study's MetaArch would otherwise swallow it), before training.
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", tiny_dataset, "--epochs", "1", "--output_dir", tmp_path / "out",
            "--model_kwargs", "depth=(1,1,1,1)"]
    assert parser.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert "ERROR: --model_kwargs" in err and "'depth'" in err and "Traceback" not in err, err
    assert not (tmp_path / "out" / "log.txt").exists()


# ------------------------------------------------------------------------------------------- --head_init_scale
def test_head_init_scale_multiplies_the_new_head(parser):
    torch.manual_seed(0)
    plain = create_model(model_args(parser.get_args_parser()))
    torch.manual_seed(0)
    scaled = create_model(model_args(parser.get_args_parser(), "--head_init_scale", "0.25"))
    assert torch.equal(scaled.head.weight, plain.head.weight * 0.25)  # power-of-two scale: exact
    assert torch.equal(scaled.head.bias, plain.head.bias * 0.25)
    assert torch.equal(scaled.stages[0][0].pwconv1.weight, plain.stages[0][0].pwconv1.weight)


# ------------------------------------------------------------------------------------------- --grad_checkpointing
def test_grad_checkpointing_recomputes_and_gives_equal_gradients(parser):
    """Each block's forward runs again in the backward pass (it is really checkpointed), and the gradients
    equal the plain model's: the recomputation runs the same float32 kernels on the same inputs."""
    torch.manual_seed(0)
    plain = create_model(model_args(parser.get_args_parser()))
    ckpt = create_model(model_args(parser.get_args_parser(), "--grad_checkpointing", "true"))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    calls = {"n": 0}
    block = ckpt.stages[2][0]
    block_forward = block.forward

    def counting_forward(*args, **kwargs):  # (forward hooks do not fire during checkpoint recomputation)
        calls["n"] += 1
        return block_forward(*args, **kwargs)

    block.forward = counting_forward
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    target = torch.tensor([1, 3])
    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls["n"] == 2  # forward + recomputation during backward
    for name, g in grads[0].items():
        # Same operations on the same values; allow one float32 rounding step relative to the gradient size.
        tol = 4 * torch.finfo(torch.float32).eps * float(g.abs().max().clamp_min(1e-12))
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=tol, msg=name)


def test_grad_checkpointing_trains_through_main(parser, tiny_dataset, tmp_path):
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", tiny_dataset, "--epochs", "1", "--output_dir", tmp_path / "out",
            "--grad_checkpointing", "true", "--model_ema", "false", "--drop_path", "0.1"]
    assert parser.main(list(map(str, argv))) == 0
    from stm_cls.checkpoint import load_file

    saved = load_file(tmp_path / "out" / "checkpoint-0.pth")["args"]
    assert saved.grad_checkpointing is True and saved.drop_path == 0.1


# ------------------------------------------------------------------------------------------- --pretrained
@pytest.fixture(scope="module")
def released_weights(tmp_path_factory) -> tuple[Path, dict]:
    """A weights-only file in the pretrained format (1000 classes, the pretrained_cfg's), as the study releases."""
    torch.manual_seed(123)
    model = timm.create_model(MICRO, num_classes=1000, img_size=32)
    path = tmp_path_factory.mktemp("released") / "unified_convnext_micro.pth"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return path, state


def test_pretrained_path_loads_and_resets_head(parser, released_weights):
    path, state = released_weights
    torch.manual_seed(0)
    args = model_args(parser.get_args_parser(), "--pretrained_path", path)
    model = create_model(args)
    own = model.state_dict()
    assert own["head.weight"].shape == (5, own["head.weight"].shape[1])  # re-initialised for 5 classes
    backbone = [k for k in state if not k.startswith("head.") and "num_batches_tracked" not in k]
    assert backbone and all(torch.equal(own[k], state[k]) for k in backbone)
    # Same class count as the weights: the head is loaded too.
    same = create_model(parser.get_args_parser().parse_args(
        ["--model", MICRO, "--input_size", "32", "--nb_classes", "1000", "--pretrained_path", str(path)]))
    assert torch.equal(same.head.weight, state["head.weight"])


def test_pretrained_errors(parser, released_weights, tmp_path, tiny_dataset, capsys):
    with pytest.raises(ModelConfigError, match="--pretrained_path: file not found"):
        create_model(model_args(parser.get_args_parser(), "--pretrained_path", tmp_path / "none.pth"))
    # No hosted weights for the study's models: a clear message naming the released file, exit 2 via main.
    argv = [*FAST_ARGS, *NO_AUG_ARGS, "--data_path", tiny_dataset, "--epochs", "1", "--pretrained", "true"]
    assert parser.main(list(map(str, argv))) == 2
    err = capsys.readouterr().err
    assert "ERROR: --pretrained: cannot load weights for 'unified_convnext_micro'" in err
    assert "unified_convnext_micro.pth" in err, err


# ------------------------------------------------------------------------------------------- eval transform
def test_eval_transform_from_pretrained_cfg_unless_overridden(parser):
    cfg = timm.models.get_pretrained_cfg("test_vit").to_dict()  # a timm model whose cfg is not the study's
    args = parser.get_args_parser().parse_args(["--model", "test_vit", "--input_size", "64"])
    conf = eval_transform_config(args)
    assert conf["crop_pct"] == cfg["crop_pct"] and conf["interpolation"] == cfg["interpolation"]
    assert conf["mean"] == pytest.approx(cfg["mean"]) and conf["std"] == pytest.approx(cfg["std"])
    assert conf["crop_mode"] == "center" and conf["input_size"] == 64

    args = parser.get_args_parser().parse_args(["--model", "test_vit", "--input_size", "64", "--crop_pct", "0.5",
                                                "--eval_interpolation", "nearest",
                                                "--imagenet_default_mean_and_std", "false"])
    conf = eval_transform_config(args)
    assert (conf["crop_pct"], conf["interpolation"]) == (0.5, "nearest")
    assert conf["mean"] == pytest.approx([0.5] * 3) and conf["std"] == pytest.approx([0.5] * 3)

    # The study's models: 0.875 / bicubic / ImageNet mean-std, and the study's squash at >= 384 px.
    study = parser.get_args_parser().parse_args(["--model", MICRO, "--input_size", "384"])
    assert eval_transform_config(study)["crop_mode"] == "squash"
    study.input_size = 32
    conf = eval_transform_config(study)
    assert (conf["crop_pct"], conf["interpolation"], conf["crop_mode"]) == (0.875, "bicubic", "center")
    assert conf["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_eval_transform_pixels_and_record(parser):
    """The built transform does what the config says (independent computation with PIL), and is recorded
    in args for the checkpoint."""
    from PIL import Image

    args = parser.get_args_parser().parse_args(["--model", MICRO, "--input_size", "16", "--crop_pct", "0.5",
                                                "--eval_interpolation", "nearest"])
    transform = build_transform(False, args)
    assert args.eval_transform["crop_pct"] == 0.5 and args.eval_transform["input_size"] == 16
    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels)
    out = transform(img)
    # Resize the short side to 16 / 0.5 = 32 (nearest), centre-crop 16, then normalise.
    expected = img.resize((32, 32), Image.NEAREST).crop((8, 8, 24, 24))
    mean = torch.tensor(args.eval_transform["mean"]).view(3, 1, 1)
    std = torch.tensor(args.eval_transform["std"]).view(3, 1, 1)
    ref = (torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_no_literal_eval_of_untrusted_code():
    """literal_eval only: an expression with a call is refused, never evaluated."""
    with pytest.raises(argparse.ArgumentTypeError, match="not a Python literal"):
        parse_model_kwarg("x=__import__('os').system('true')")
