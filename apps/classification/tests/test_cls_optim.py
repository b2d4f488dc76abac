"""Parameter groups, layer decay ids, the per-iteration schedules, and boolean parsing."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
from torch import nn

from stm_cls.config import str2bool
from stm_cls.ema import ModelEma
from stm_cls.optim import build_optimizer, cosine_schedule, layer_id, param_groups


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.gamma = nn.Parameter(torch.ones(1, 4, 1, 1))  # ConvNeXt-style 4-D layer scale: decayed
        self.gamma_1d = nn.Parameter(torch.ones(4))  # 1-D layer scale: not decayed
        self.table = nn.Parameter(torch.zeros(9, 2))
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self):
        return {"table"}


def test_no_weight_decay_rules():
    groups = {g["group_name"]: set(g["param_names"]) for g in param_groups(Toy(), 0.05)}
    assert groups["decay"] == {"conv.weight", "gamma", "head.weight"}
    assert groups["no_decay"] == {"conv.bias", "norm.weight", "norm.bias", "gamma_1d", "table", "head.bias"}


def test_layer_ids_and_layer_decay_groups():
    assert [layer_id(n) for n in ("downsample_layers.0.stem.0.weight", "stages.0.1.x", "downsample_layers.1.r",
                                  "stages.1.0.x", "downsample_layers.2.r", "stages.2.0.x", "stages.2.8.x",
                                  "downsample_layers.3.r", "stages.3.1.x", "conv_head.0.weight", "head.bias")] == \
        [0, 1, 2, 2, 3, 3, 5, 12, 12, 13, 13]
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.5, opt_eps=1e-8, opt_betas=None, opt="adamw",
                              lr=1e-3, momentum=0.9)
    opt = build_optimizer(args, Toy())
    assert {g["group_name"] for g in opt.param_groups} == {"layer_13_decay", "layer_13_no_decay"}
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)  # 0.5 ** (13 - 13)


def test_cosine_schedule_formula():
    lr, min_lr, epochs, iters, warm = 1e-3, 1e-5, 5, 4, 2
    s = cosine_schedule(lr, min_lr, epochs, iters, warm, 1e-6)
    assert len(s) == epochs * iters
    assert np.allclose(s[:8], np.linspace(1e-6, lr, 8)) and s[0] == 1e-6 and s[7] == lr
    t = epochs * iters - 8
    assert all(math.isclose(s[8 + i], min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * i / t)))
               for i in range(t))
    assert s[-1] > min_lr
    assert len(cosine_schedule(lr, min_lr, epochs, iters, 0, 0, warmup_steps=3)) == epochs * iters
    assert np.all(cosine_schedule(0.05, 0.05, 3, 2) == 0.05)  # constant weight decay


def test_ema_copies_integer_buffers():
    model = nn.BatchNorm1d(3)
    ema = ModelEma(model, decay=0.9)
    model.num_batches_tracked += 7
    with torch.no_grad():
        model.weight.fill_(2.0)
    ema.update(model)
    assert int(ema.module.num_batches_tracked) == 7
    assert torch.allclose(ema.module.weight, torch.full((3,), 1.1))


@pytest.mark.parametrize("text,value", [("yes", True), ("True", True), ("1", True), ("t", True), ("n", False),
                                        ("false", False), ("0", False)])
def test_str2bool(text, value):
    assert str2bool(text) is value
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")
