"""Tests of dinolab.augment: crop geometry, HSV, and the multi-crop augmentation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinolab.augment import MultiCropAugmentation, crop_and_resize, denormalize, hsv_to_rgb, rgb_to_hsv


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crop_and_resize_geometry():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 16, 20)
    full = torch.tensor([[0.0, 0.0, 20.0, 16.0]] * 2)
    torch.testing.assert_close(crop_and_resize(img, full, (16, 20)), img)  # identity
    torch.testing.assert_close(crop_and_resize(img, full, (16, 20), flip=torch.tensor([True, False]))[0],
                               img[0].flip(-1))
    quad = torch.tensor([[4.0, 2.0, 12.0, 10.0], [0.0, 8.0, 8.0, 16.0]])
    out = crop_and_resize(img, quad, 8)  # same resolution: an exact pixel copy
    torch.testing.assert_close(out[0], img[0, :, 2:10, 4:12])
    torch.testing.assert_close(out[1], img[1, :, 8:16, 0:8])
    # 2x downscale with antialias = 2x2 average pooling
    torch.testing.assert_close(crop_and_resize(img, full, (8, 10)), F.avg_pool2d(img, 2))


def test_hsv_round_trip():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 5, 5)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, rtol=1e-5, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hsv = rgb_to_hsv(red)
    hsv[:, 0] += 1 / 3
    torch.testing.assert_close(hsv_to_rgb(hsv).flatten(), torch.tensor([0.0, 1.0, 0.0]))


def test_multicrop_shapes_ranges_determinism():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, normalize=False)
    images = torch.rand(4, 3, 48, 64, generator=_gen(0))
    out = aug(images, generator=_gen(1))
    assert out["global_crops"].shape == (8, 3, 32, 32)
    assert out["local_crops"].shape == (12, 3, 16, 16)
    assert out["global_boxes"].shape == (2, 4, 4) and out["local_flips"].shape == (3, 4)
    for k in ("global_crops", "local_crops"):
        assert out[k].min() >= 0.0 and out[k].max() <= 1.0
    # box areas within the requested scale range (up to rounding)
    for key, (lo, hi) in (("global_boxes", (0.32, 1.0)), ("local_boxes", (0.05, 0.32))):
        b = out[key]
        frac = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) / (48 * 64)
        assert frac.min() >= lo * 0.9 and frac.max() <= hi * 1.1
        assert (b[..., 0] >= 0).all() and (b[..., 2] <= 64).all() and (b[..., 3] <= 48).all()
    out2 = aug(images, generator=_gen(1))
    for k in out:
        assert torch.equal(out[k], out2[k]), k
    out3 = aug(images, generator=_gen(2))
    assert not torch.equal(out["global_crops"], out3["global_crops"])


def test_multicrop_normalisation_and_plain_crops():
    images = torch.rand(2, 3, 40, 40, generator=_gen(0))
    plain = MultiCropAugmentation(
        global_size=16, local_size=16, n_local=2, color_jitter_p=0.0, grayscale_p=0.0,
        blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, hflip_p=0.0, normalize=False,
    )
    normed = MultiCropAugmentation(
        global_size=16, local_size=16, n_local=2, color_jitter_p=0.0, grayscale_p=0.0,
        blur_p=(0.0, 0.0, 0.0), solarize_p=0.0, hflip_p=0.0, normalize=True,
    )
    a, b = plain(images, generator=_gen(3)), normed(images, generator=_gen(3))
    torch.testing.assert_close(denormalize(b["global_crops"]), a["global_crops"], rtol=1e-5, atol=1e-5)
    # with no photometric ops, a crop equals crop_and_resize of its box
    ref = crop_and_resize(images, a["global_boxes"][0], 16)
    torch.testing.assert_close(a["global_crops"][:2], ref)
    # grayscale with p=1 gives equal channels
    gray = MultiCropAugmentation(global_size=16, local_size=16, n_local=0, grayscale_p=1.0, normalize=False)
    g = gray(images, generator=_gen(0))["global_crops"]
    torch.testing.assert_close(g[:, 0], g[:, 1])
    assert gray(images, generator=_gen(0))["local_crops"].shape[0] == 0


def test_multicrop_bad_inputs():
    with pytest.raises(ValueError, match="multiple"):
        MultiCropAugmentation(global_size=100)
    with pytest.raises(ValueError):
        MultiCropAugmentation(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hue"):
        MultiCropAugmentation(hue=0.7)
    aug = MultiCropAugmentation(global_size=16, local_size=16, n_local=1)
    with pytest.raises(ValueError, match="3 channels"):
        aug(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        aug(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aug(torch.randn(2, 3, 32, 32) * 3)
    assert aug((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), generator=_gen(0))["global_crops"].shape == (2, 3, 16, 16)


def test_multicrop_second_render_feeds_the_odd_views():
    # photometric augmentations off: each crop is then a pure function of its source image and box
    aug = MultiCropAugmentation(global_size=16, local_size=16, n_local=4, normalize=False, color_jitter_p=0.0,
                                grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    a, b = torch.rand(3, 3, 32, 32, generator=_gen(0)), torch.rand(3, 3, 32, 32, generator=_gen(1))
    both = aug(a, generator=_gen(5), second=b)
    only_a, only_b = aug(a, generator=_gen(5)), aug(b, generator=_gen(5))  # same boxes and flips
    g, l = both["global_crops"].view(2, 3, 3, 16, 16), both["local_crops"].view(4, 3, 3, 16, 16)
    ga, gb = only_a["global_crops"].view(2, 3, 3, 16, 16), only_b["global_crops"].view(2, 3, 3, 16, 16)
    la, lb = only_a["local_crops"].view(4, 3, 3, 16, 16), only_b["local_crops"].view(4, 3, 3, 16, 16)
    assert torch.equal(g[0], ga[0]) and torch.equal(g[1], gb[1])
    for v in range(4):
        assert torch.equal(l[v], (la if v % 2 == 0 else lb)[v])
    with pytest.raises(ValueError, match="second"):
        aug(a, second=b[:2])
