import math

import pytest
import torch

from dinolab.rope import RopePositionEmbedding, rope_apply, rope_rotate_half


def test_periods_base_and_min_max():
    r = RopePositionEmbedding(384, num_heads=6, base=100.0)
    k = torch.arange(16, dtype=torch.float64)
    torch.testing.assert_close(r.periods.double(), 100.0 ** (4 * k / 64), rtol=1e-6, atol=0)
    r2 = RopePositionEmbedding(384, num_heads=6, base=None, min_period=0.5, max_period=50.0)
    assert r2.periods[0].item() == pytest.approx(0.5) and r2.periods[-1].item() == pytest.approx(50.0)
    ratios = r2.periods[1:] / r2.periods[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)  # geometric


def test_coordinate_normalisation():
    for mode, expect_w in [("separate", 1 - 1 / 6), ("max", 1 - 1 / 6), ("min", (6 - 0.5) / 3 * 2 - 1)]:
        r = RopePositionEmbedding(64, num_heads=1, normalize_coords=mode).eval()
        c = r.coords(3, 6)
        assert c.shape == (18, 2)
        assert c[-1, 1].item() == pytest.approx(expect_w, abs=1e-6)
    sep = RopePositionEmbedding(64, num_heads=1).eval().coords(3, 6)
    assert sep[:, 0].min().item() == pytest.approx(-(1 - 1 / 3)) and sep[:, 0].max().item() == pytest.approx(1 - 1 / 3)


def test_rotation_preserves_norm_and_rotate_half_layout():
    x = torch.arange(8.0)
    assert rope_rotate_half(x).tolist() == [-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0]
    r = RopePositionEmbedding(256, num_heads=4).eval()
    sin, cos = r(H=5, W=7)
    q = torch.randn(2, 4, 35, 64)
    torch.testing.assert_close(rope_apply(q, sin, cos).norm(dim=-1), q.norm(dim=-1), atol=1e-5, rtol=1e-5)


def test_attention_logit_depends_only_on_relative_offset():
    """The RoPE identity: <R(p) q, R(p') k> = <q, R(p' - p) k>. Same q and k at every position:
    the logit between two patches must depend only on their (row, col) offset."""
    D = 64
    r = RopePositionEmbedding(D, num_heads=1, normalize_coords="max", dtype="fp32").eval()
    H = W = 6
    sin, cos = r(H=H, W=W)
    q = torch.randn(D, dtype=torch.float64).expand(H * W, D)
    k = torch.randn(D, dtype=torch.float64).expand(H * W, D)
    qr, kr = rope_apply(q, sin.double(), cos.double()), rope_apply(k, sin.double(), cos.double())
    logits = qr @ kr.T  # (HW, HW)
    pos = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1).reshape(-1, 2)
    offsets = {}
    for i in range(H * W):
        for j in range(H * W):
            key = tuple((pos[j] - pos[i]).tolist())
            offsets.setdefault(key, []).append(logits[i, j].item())
    spread = max(max(v) - min(v) for v in offsets.values())
    assert spread < 1e-5
    assert len({round(v[0], 6) for v in offsets.values()}) > 10  # and it does depend on the offset


def test_training_augmentations():
    r = RopePositionEmbedding(64, num_heads=1, shift_coords=0.1, jitter_coords=1.5, rescale_coords=2.0)
    r.eval()
    base = r.coords(4, 4)
    r.train()
    torch.manual_seed(0)
    aug = r.coords(4, 4)
    assert not torch.allclose(aug, base)
    only_rescale = RopePositionEmbedding(64, num_heads=1, rescale_coords=2.0).train()
    c = only_rescale.coords(4, 4)
    factor = c / base
    assert torch.allclose(factor, factor[0, 0].expand_as(factor))  # one factor, both axes
    assert 0.5 <= factor[0, 0].item() <= 2.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="4 \\* num_heads"):
        RopePositionEmbedding(90, num_heads=5)
    with pytest.raises(ValueError, match="either base"):
        RopePositionEmbedding(64, num_heads=1, base=100.0, min_period=1.0, max_period=10.0)
    with pytest.raises(ValueError, match="either base"):
        RopePositionEmbedding(64, num_heads=1, base=None)
    with pytest.raises(ValueError, match="normalize_coords"):
        RopePositionEmbedding(64, num_heads=1, normalize_coords="both")


def test_angles_formula():
    r = RopePositionEmbedding(64, num_heads=1).eval()
    sin, cos = r(H=2, W=3)
    coords = r.coords(2, 3)
    ang = 2 * math.pi * coords[:, :, None] / r.periods
    expect = torch.cat([ang[:, 0], ang[:, 1], ang[:, 0], ang[:, 1]], -1)
    torch.testing.assert_close(sin, torch.sin(expect))
