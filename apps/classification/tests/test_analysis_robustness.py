"""FGSM/PGD sanity properties on a small classifier trained here on the digits (seeded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stm_cls.analysis import robustness as rob

EPS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # in 1/255


@pytest.fixture(scope="module")
def digits_model():
    """A linear softmax classifier on 3x8x8 digit images in [0, 1]: accurate and attackable in a second."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    train, test = slice(0, 1400), slice(1400, 1600)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    return model.eval(), x[test], y[test]


def accuracy(model, x, y) -> float:
    return float(rob.correct(model, x, y, torch.device("cpu"), False).double().mean())


def attack_curves(model, x, y):
    ids = list(range(len(x)))
    clean = accuracy(model, x, y)
    fgsm, pgd = [], []
    for k, eps in enumerate(EPS):
        e = eps / 255
        fgsm.append(accuracy(model, rob.fgsm(model, x, y, e), y))
        start = rob.random_start(x.shape, e, 0, ids, k)
        pgd.append(accuracy(model, rob.pgd(model, x, y, e, steps=10, step_ratio=0.25, start=start), y))
    return clean, fgsm, pgd


def test_eps_zero_is_clean_and_attacks_only_lower_accuracy(digits_model):
    model, x, y = digits_model
    clean, fgsm, pgd = attack_curves(model, x, y)
    assert clean > 0.85  # the model has learnt the digits
    assert fgsm[0] == clean and pgd[0] == clean
    assert torch.equal(rob.fgsm(model, x, y, 0.0), x) and torch.equal(rob.pgd(model, x, y, 0.0), x)
    for curve in (fgsm, pgd):
        assert all(b <= a for a, b in zip(curve, curve[1:])), curve  # no rise with eps
    assert pgd[-1] < clean - 0.3  # a large budget does real damage
    assert all(p <= f for p, f in zip(pgd, fgsm)), (pgd, fgsm)  # PGD at least as strong as FGSM
    assert any(p < f for p, f in zip(pgd, fgsm))


def test_perturbations_stay_in_the_ball_and_the_image_range(digits_model):
    model, x, y = digits_model
    e = 8 / 255
    start = rob.random_start(x.shape, e, 0, range(len(x)), 0)
    assert start.abs().max() <= e + 1e-7
    for adv in (rob.fgsm(model, x, y, e), rob.pgd(model, x, y, e, start=start)):
        assert (adv - x).abs().max() <= e + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1


def test_random_start_depends_on_image_not_batch():
    a = rob.random_start((3, 3, 4, 4), 0.1, 0, [5, 6, 7], 1)
    b = rob.random_start((1, 3, 4, 4), 0.1, 0, [6], 1)
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert not np.array_equal(rob.random_start((1, 3, 4, 4), 0.1, 1, [6], 1).numpy(), b.numpy())


def test_run_on_a_micro_model_reports_clean_at_eps_zero(tiny_dataset):
    import timm

    import stm_backbones  # noqa: F401
    from stm_cls.analysis import common

    torch.manual_seed(0)
    net = timm.create_model("unified_convnext_micro", num_classes=4, img_size=32).eval()
    model = common.Normalized(net, common.IMAGENET_MEAN, common.IMAGENET_STD)
    dataset, _ = common.eval_images(str(tiny_dataset), 4)
    res = rob.run({"m": model}, dataset, list(range(8)), size=32, crop_pct=0.875, batch_size=4, num_workers=0,
                  device=torch.device("cpu"), use_amp=False, seed=0, eps_list=(0.0, 4.0), steps=2)["m"]
    assert res["num_images"] == 8
    assert res["fgsm"][0] == {"eps": 0.0, "top1": res["clean_top1"]}
    assert res["pgd"][0] == {"eps": 0.0, "top1": res["clean_top1"]}
