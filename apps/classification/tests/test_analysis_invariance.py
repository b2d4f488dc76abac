"""Invariance views and metrics against hand-computed crops, torch.rot90 and the reference view."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from stm_cls.analysis import invariance as inv


def test_shifted_crop_equals_hand_computed_crops():
    img = torch.arange(100, dtype=torch.int64).view(1, 10, 10)
    # 6x6 centre crop of a 10x10 image starts at (2, 2).
    assert torch.equal(inv.shifted_crop(img, 6, 0, 0), img[:, 2:8, 2:8])
    # 3 px right and down: rows/cols 5..10 of which 5..9 exist; 5x5 kept, padded by 0 before and 1 after.
    expected = torch.zeros(1, 6, 6, dtype=torch.int64)
    expected[:, :5, :5] = img[:, 5:10, 5:10]
    assert torch.equal(inv.shifted_crop(img, 6, 3, 3), expected)
    # 4 px left: cols -2..3, of which 0..3 exist; 4 columns padded 1 left and 1 right.
    expected = torch.zeros(1, 6, 6, dtype=torch.int64)
    expected[:, :, 1:5] = img[:, 2:8, 0:4]
    assert torch.equal(inv.shifted_crop(img, 6, -4, 0), expected)
    # 2 px up: rows 0..5 exist, nothing padded.
    assert torch.equal(inv.shifted_crop(img, 6, 0, -2), img[:, 0:6, 2:8])


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


def test_translation_strength_zero_is_the_reference_view():
    maker = inv.ViewMaker(32, 0.875, transforms=("translation",), seed=3)
    views = maker(random_image(40, 52), index=7)
    assert views.shape == (1 + len(inv.TRANSLATION_STRENGTHS), 3, 32, 32) and views.dtype == torch.uint8
    assert torch.equal(views[1], views[0])
    assert not torch.equal(views[-1], views[0])


def test_translation_view_is_the_drawn_direction_crop():
    size, maker = 32, inv.ViewMaker(32, 0.875, transforms=("translation",), seed=5)
    img = random_image(36, 36, seed=2)
    views = maker(img, index=11)
    resized = inv.to_uint8_tensor(inv.resize_short(img, int(size / 0.875)))
    for k in (3, 16):
        px = round(inv.TRANSLATION_STRENGTHS[k] * size / 224)
        dx, dy = inv.translation_direction(5, 11, k, quirks=False)
        assert abs(dx) + abs(dy) in (1, 2)
        assert torch.equal(views[1 + k], inv.shifted_crop(resized, size, dx * px, dy * px))


def test_directions_cover_all_eight_and_the_quirk_only_seven():
    drawn = {inv.translation_direction(0, i, k, quirks=False) for i in range(60) for k in range(4)}
    quirky = {inv.translation_direction(0, i, k, quirks=True) for i in range(60) for k in range(4)}
    assert drawn == set(inv.DIRECTIONS)
    assert quirky == set(inv.DIRECTIONS[:7])


def test_rotation_zero_is_identity_and_ninety_is_rot90():
    maker = inv.ViewMaker(24, 1.0, transforms=("pre_rotation", "post_rotation"))
    img = random_image(24, 24, seed=4)
    views = maker(img, index=0)
    ref = views[0]
    assert torch.equal(ref, inv.to_uint8_tensor(img))
    n = len(inv.ROTATION_ANGLES)
    pre, post = views[1:1 + n], views[1 + n:]
    rot90 = torch.rot90(ref, 1, dims=(-2, -1))  # counter-clockwise
    for group in (pre, post):
        assert torch.equal(group[0], ref)
        assert torch.equal(group[inv.ROTATION_ANGLES.index(90)], rot90)
    # A rotation in between moves pixels and fills the corners with black.
    assert (post[inv.ROTATION_ANGLES.index(45)][:, 0, 0] == 0).all()


def test_scale_ratio_above_one_pads_with_black():
    maker = inv.ViewMaker(32, 0.875, transforms=("scale",))
    views = maker(random_image(64, 64, seed=1) , index=0)
    last = views[-1]  # r = 1.95: the image is resized to 16 px and padded to 32
    assert inv.SCALE_RATIOS[-1] == 1.95
    assert (last[:, :8] == 0).all() and (last[:, 8:24, 8:24] > 0).any()


def test_metrics_of_identical_views():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)).repeat(4, 1)
    rows = inv.per_sample_metrics(logits, label=int(logits[0].argmax()))
    assert (rows[:, :3] == 1).all()
    p = logits[0].softmax(0)
    entropy = float(-(p * p.log()).sum())  # soft CE of a view equal to the reference = its entropy
    assert np.allclose(rows[:, 3], entropy, rtol=1e-5)


def test_strength_zero_consistency_is_100_on_a_model(tiny_dataset):
    import timm

    import stm_backbones  # noqa: F401
    from stm_cls.analysis import common

    torch.manual_seed(0)
    net = timm.create_model("unified_convnext_micro", num_classes=4, img_size=32).eval()
    model = common.Normalized(net, common.IMAGENET_MEAN, common.IMAGENET_STD)
    dataset, _ = common.eval_images(str(tiny_dataset), 4)
    res = inv.run({"m": model}, dataset, list(range(6)), size=32, crop_pct=0.875, batch_size=64, num_workers=0,
                  device=torch.device("cpu"), use_amp=False, seed=0, quirks=False, transforms=("translation",))["m"]
    first = res["translation"][0]
    assert first["strength"] == 0 and first["consistency"] == 100.0
    assert first["top1"] == res["clean_top1"] and first["top5"] == res["clean_top5"]
    assert res["num_images"] == 6 and len(res["translation"]) == 17
