"""ERF analysis against the theoretical receptive field of a linear convolution stack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stm_backbones import create_model
from stm_cls.analysis import erf


def conv_stack(num_layers: int, kernel: int, channels: int = 3) -> nn.Sequential:
    """Stride-1 convolutions with positive weights and no nonlinearity."""
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(num_layers):
        conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.rand(conv.weight.shape, generator=g) + 0.1)
        layers.append(conv)
    return nn.Sequential(*layers)


def support_square(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max(), cols.min(), cols.max()


@pytest.mark.parametrize("num_layers,kernel", [(1, 3), (3, 5), (4, 3), (2, 7)])
def test_gradient_support_is_the_theoretical_receptive_field(num_layers, kernel):
    size = 41
    net = conv_stack(num_layers, kernel)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # positive: ReLU(y) = y
    (maps,) = erf.batch_maps(lambda x: [net(x)], images)
    side = erf.theoretical_side(num_layers, kernel)
    assert side == 1 + num_layers * (kernel - 1)
    c, r = size // 2, side // 2
    for m in maps.numpy():
        assert support_square(m > 0) == (c - r, c + r, c - r, c + r)
        assert (m[c - r:c + r + 1, c - r:c + r + 1] > 0).all()  # the whole square, not just its corners


def test_several_stages_from_one_forward():
    net = conv_stack(3, 3)
    images = torch.rand(2, 3, 21, 21, generator=torch.Generator().manual_seed(2))
    maps = erf.batch_maps(lambda x: [net[:1](x), net(x)], images)
    sides = [support_square(m[0].numpy() > 0) for m in maps]
    assert sides == [(9, 11, 9, 11), (7, 13, 7, 13)]


@pytest.mark.parametrize("t", erf.THRESHOLDS)
def test_square_summary_of_a_uniform_square(t):
    """A map that is 1 on a centred 9x9 square: the smallest odd square holding more than t of the
    mass has side s with s^2 > 81 t (computed here by counting, not by the code under test)."""
    m = np.zeros((33, 33))
    m[12:21, 12:21] = 1.0
    expected = min(s for s in range(1, 34, 2) if min(s, 9) ** 2 > t * 81)
    summary = erf.summarize_map(m)[str(t)]
    assert summary["side"] == expected
    assert summary["side_ratio"] == pytest.approx(expected / 33)
    assert summary["area_ratio"] == pytest.approx((expected / 33) ** 2)


def test_micro_model_stage1_map_within_its_theoretical_receptive_field():
    """unified_convnext_micro's stage 1 is local: stem 3x3/2 + 3x3/2 (receptive field 7 px, jump 4), then
    3 blocks with a 7x7 depth-wise conv at jump 4 (+24 px each): 79 px. Deeper stages reach further."""
    torch.manual_seed(0)
    model = create_model("unified_convnext_micro", num_classes=4, img_size=128).eval()
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    maps = erf.batch_maps(erf.stage_features(model, (0, 1, 2, 3)), images)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 128)] * 4
    assert all(np.isfinite(m.numpy()).all() for m in maps)
    sides = []
    for m in maps:
        r0, r1, c0, c1 = support_square(m.sum(0).numpy() > 0)
        sides.append(max(r1 - r0, c1 - c0) + 1)
    assert sides[0] == 79, sides  # the whole theoretical field (generic weights leave no zero at its edge)
    assert sides[3] > 79, sides


def test_square_summary_never_exceeds_the_map():
    """Mass in the first row of an even-sized map needs the whole map: side = 8, ratio 1."""
    m = np.zeros((8, 8))
    m[0, :] = 1.0
    assert erf.summarize_map(m)["0.5"] == {"side": 8, "side_ratio": 1.0, "area_ratio": 1.0}
