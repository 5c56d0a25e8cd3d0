"""Tests of dinolab.ssl: every object against its defining property on small tensors."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinolab.ssl import (
    DINOHead,
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    MaskingGenerator,
    MultiCropAugmentation,
    cosine_schedule,
    crop_and_resize,
    denormalize,
    hsv_to_rgb,
    iBOTPatchLoss,
    ibot_mask_weights,
    linear_warmup_then_constant,
    make_masks,
    rgb_to_hsv,
    sinkhorn_knopp,
    softmax_center_teacher,
    update_center,
    update_ema,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# DINOHead
# ------------------------------------------------------------------------------------------------
def test_dino_head_names_shapes_and_init():
    torch.manual_seed(0)
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16, nlayers=3)
    names = [n for n, _ in head.named_parameters()]
    assert names == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                     "mlp.4.weight", "mlp.4.bias", "last_layer.weight"]
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)
    assert head.last_layer.bias is None
    assert head.last_layer.weight.shape == (100, 16)
    for n, p in head.named_parameters():
        if n.endswith("bias"):
            assert torch.all(p == 0)
        else:  # trunc_normal(std=0.02) truncated at ±2 (absolute): all small, std close to 0.02
            assert p.abs().max() <= 2.0 and abs(p.std().item() - 0.02) < 0.004
    x = torch.randn(5, 7, 32)
    assert head(x).shape == (5, 7, 100)
    assert head(x, no_last_layer=True).shape == (5, 7, 16)
    assert DINOHead(8, 10, nlayers=1, bottleneck_dim=4).mlp.weight.shape == (4, 8)


def test_dino_head_normalises_bottleneck_before_last_layer():
    torch.manual_seed(0)
    head = DINOHead(12, out_dim=20, hidden_dim=24, bottleneck_dim=6)
    x = torch.randn(9, 12)
    z = head(x, no_last_layer=True)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(9))
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.t())
    torch.testing.assert_close(head(x), head(z, only_last_layer=True))
    # scaling the raw bottleneck (last MLP layer) does not change the output
    with torch.no_grad():
        head.mlp[4].weight.mul_(5.0)
        head.mlp[4].bias.mul_(5.0)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.t())


def test_dino_head_bad_inputs():
    with pytest.raises(ValueError):
        DINOHead(0)
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=4)
    with pytest.raises(ValueError, match="expects"):
        head(torch.randn(2, 9))
    with pytest.raises(ValueError):
        head(torch.randn(2, 8), no_last_layer=True, only_last_layer=True)


# ------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp and centering
# ------------------------------------------------------------------------------------------------
def _sk_reference_f64(logits: torch.Tensor, temp: float, n_iter: int) -> torch.Tensor:
    """Independent SK in float64 with (B, K) orientation: alternately fix prototype marginals to
    B/K and sample marginals to 1."""
    P = torch.exp(logits.double() / temp)
    B, K = P.shape
    P = P / P.sum()
    for _ in range(n_iter):
        P = P / P.sum(dim=0, keepdim=True) * (1.0 / K)  # each prototype total 1/K
        P = P / P.sum(dim=1, keepdim=True) * (1.0 / B)  # each sample total 1/B
    return P * B


def test_sinkhorn_rows_sum_to_one_and_columns_balanced():
    torch.manual_seed(0)
    B, K = 64, 16
    logits = torch.randn(B, K) * 2 + torch.linspace(0, 3, K)  # strongly unbalanced prototypes
    Q = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=30)
    assert Q.dtype == torch.float32 and Q.shape == (B, K)
    torch.testing.assert_close(Q.sum(dim=1), torch.ones(B))
    col = Q.sum(dim=0)
    assert torch.allclose(col, torch.full((K,), B / K), rtol=1e-3)
    # the default 3 iterations already balance far better than a plain softmax
    Q3 = sinkhorn_knopp(logits, teacher_temp=0.5)
    torch.testing.assert_close(Q3.sum(dim=1), torch.ones(B))
    col3 = Q3.sum(dim=0)
    soft_col = F.softmax(logits / 0.5, dim=-1).sum(0)
    assert (soft_col.max() / soft_col.min()) > 10 * (col3.max() / col3.min())


def test_sinkhorn_matches_float64_reference_and_accepts_nd():
    torch.manual_seed(1)
    logits = torch.randn(24, 10)
    for n_iter in (0, 1, 3, 5):
        Q = sinkhorn_knopp(logits, 0.2, n_iterations=n_iter)
        torch.testing.assert_close(Q.double(), _sk_reference_f64(logits, 0.2, n_iter), rtol=1e-4, atol=1e-6)
    # (T, B, K) is treated as T*B samples, as the official (2B, K) call
    Q3 = sinkhorn_knopp(logits.view(2, 12, 10), 0.2)
    torch.testing.assert_close(Q3.view(24, 10), sinkhorn_knopp(logits, 0.2))
    # flat iBOT input [M, K] goes through the same function and has no grad
    x = torch.randn(7, 5, requires_grad=True)
    assert not sinkhorn_knopp(x, 0.1).requires_grad
    torch.testing.assert_close(iBOTPatchLoss.sinkhorn_knopp_teacher(x, 0.1), sinkhorn_knopp(x, 0.1))


def test_sinkhorn_bad_inputs():
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.randn(4, 3), 0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.randn(4, 3), -0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(4), 0.1)


def test_centering_and_sharpening():
    torch.manual_seed(0)
    K = 8
    # a "collapsing" teacher: prototype 0 wins for every sample
    logits = torch.randn(32, K) * 0.1
    logits[:, 0] += 3.0
    center = torch.zeros(1, K)
    for _ in range(60):
        center = update_center(center, logits, momentum=0.9)
    torch.testing.assert_close(center, logits.mean(0, keepdim=True), rtol=1e-2, atol=1e-2)
    p_raw = F.softmax(logits / 0.04, dim=-1)
    p_cent = softmax_center_teacher(logits, center, 0.04)
    assert p_raw[:, 0].mean() > 0.99  # without centering: one prototype for all
    assert p_cent[:, 0].mean() < 0.5  # centering removes the dominant direction
    torch.testing.assert_close(p_cent.sum(-1), torch.ones(32))
    # one update step is the EMA formula
    c1 = update_center(torch.ones(K), logits, momentum=0.9)
    torch.testing.assert_close(c1, 0.9 * torch.ones(K) + 0.1 * logits.mean(0))
    with pytest.raises(ValueError):
        softmax_center_teacher(logits, center, 0.0)


# ------------------------------------------------------------------------------------------------
# DINO loss
# ------------------------------------------------------------------------------------------------
def _dino_brute(student, teacher, temp, ignore_diagonal):
    S, B, K = student.shape
    T = teacher.shape[0]
    total, count = 0.0, 0
    for s in range(S):
        for t in range(T):
            if ignore_diagonal and s == t:
                continue
            for b in range(B):
                log_q = F.log_softmax(student[s, b].double() / temp, dim=-1)
                total += -(teacher[t, b].double() * log_q).sum().item()
                count += 1
    return total / count


@pytest.mark.parametrize("S,T", [(2, 2), (5, 2), (2, 3)])
@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_equals_brute_force(S, T, ignore_diagonal):
    torch.manual_seed(S * 10 + T)
    B, K = 3, 7
    student = torch.randn(S, B, K)
    teacher = F.softmax(torch.randn(T, B, K), dim=-1)
    loss = DINOLoss(K, student_temp=0.1)(student, teacher, ignore_diagonal=ignore_diagonal)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert math.isclose(loss.item(), _dino_brute(student, teacher, 0.1, ignore_diagonal), rel_tol=1e-5)


def test_dino_loss_normalisation_and_gradient():
    torch.manual_seed(0)
    S, T, B, K = 2, 2, 4, 5
    student = torch.randn(S, B, K, requires_grad=True)
    teacher = F.softmax(torch.randn(T, B, K), dim=-1)
    crit = DINOLoss(K)
    per_pair = torch.stack([
        torch.stack([-(teacher[t] * F.log_softmax(student[s] / 0.1, -1)).sum(-1).mean() for t in range(T)])
        for s in range(S)
    ])
    # ignore_diagonal divides by B*S*T - B*min(S,T): the mean over the off-diagonal pairs
    torch.testing.assert_close(crit(student, teacher, ignore_diagonal=True), (per_pair[0, 1] + per_pair[1, 0]) / 2)
    crit(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_dino_loss_bad_inputs():
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(5, student_temp=0)
    crit = DINOLoss(5)
    with pytest.raises(ValueError, match="3-D"):
        crit(torch.randn(4, 5), torch.rand(1, 4, 5))
    with pytest.raises(ValueError, match="mismatch"):
        crit(torch.randn(2, 4, 6), torch.rand(2, 4, 6))
    with pytest.raises(ValueError, match="mismatch"):
        crit(torch.randn(2, 4, 5), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="no crop pair"):
        crit(torch.randn(1, 4, 5), torch.rand(1, 4, 5), ignore_diagonal=True)


# ------------------------------------------------------------------------------------------------
# iBOT loss
# ------------------------------------------------------------------------------------------------
def test_ibot_loss_equals_per_image_mean_brute_force():
    torch.manual_seed(0)
    B, N, K = 4, 9, 6
    masks = torch.zeros(B, N, dtype=torch.bool)
    masks[0, [1, 2, 5]] = True
    masks[2, [0]] = True
    masks[3, :7] = True  # image 1 has no mask
    s_dense = torch.randn(B, N, K)
    t_dense = F.softmax(torch.randn(B, N, K), dim=-1)
    # brute force: per image, mean over its masked patches; then sum / B (unmasked images count 0)
    total = 0.0
    for b in range(B):
        idx = masks[b].nonzero().flatten().tolist()
        if not idx:
            continue
        ce = [-(t_dense[b, i].double() * F.log_softmax(s_dense[b, i].double() / 0.1, -1)).sum().item() for i in idx]
        total += sum(ce) / len(ce)
    expected = total / B
    crit = iBOTPatchLoss(student_temp=0.1)
    s_flat, t_flat = s_dense[masks], t_dense[masks]  # (M, K), row-major = masks.flatten().nonzero()
    assert s_flat.shape == (11, K)
    assert math.isclose(crit.forward_masked(s_flat, t_flat, masks).item(), expected, rel_tol=1e-5)
    assert math.isclose(crit(s_dense, t_dense, masks).item(), expected, rel_tol=1e-5)
    w = ibot_mask_weights(masks)
    torch.testing.assert_close(w[:3], torch.full((3,), 1 / 3))
    torch.testing.assert_close(crit.forward_masked(s_flat, t_flat, masks, masks_weight=w), crit(s_dense, t_dense, masks))


def test_ibot_bad_inputs():
    with pytest.raises(ValueError, match="student_temp"):
        iBOTPatchLoss(student_temp=-1.0)
    crit = iBOTPatchLoss()
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :2] = True
    with pytest.raises(ValueError, match="masked patches"):
        crit.forward_masked(torch.randn(3, 5), torch.rand(3, 5), masks)
    with pytest.raises(ValueError, match="2-D"):
        crit.forward_masked(torch.randn(2, 1, 5), torch.rand(2, 1, 5), masks)
    with pytest.raises(ValueError, match="masks_weight"):
        crit.forward_masked(torch.randn(2, 5), torch.rand(2, 5), masks, masks_weight=torch.ones(3))


# ------------------------------------------------------------------------------------------------
# masking
# ------------------------------------------------------------------------------------------------
def _neighbour_fraction(mask: torch.Tensor) -> float:
    m = mask.float()[None, None]
    k = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)[None, None]
    n = F.conv2d(m, k, padding=1)[0, 0]
    return ((n > 0) & mask).sum().item() / max(1, mask.sum().item())


def test_masking_generator_exact_counts_blocky_and_seeded():
    gen = MaskingGenerator((14, 14), max_num_patches=0.5 * 196)
    for count in (0, 1, 7, 20, 50, 98, 150):
        m = gen(count, generator=random.Random(count))
        assert m.dtype == torch.bool and m.shape == (14, 14)
        assert m.sum().item() == count
    fractions = [_neighbour_fraction(gen(40, generator=seed)) for seed in range(20)]
    assert np.mean(fractions) > 0.9  # blocks, not salt-and-pepper
    rand = torch.zeros(196, dtype=torch.bool)
    rand[torch.randperm(196, generator=_gen(0))[:40]] = True
    assert _neighbour_fraction(rand.view(14, 14)) < np.mean(fractions)
    assert torch.equal(gen(60, generator=3), gen(60, generator=3))
    assert torch.equal(gen(60, generator=_gen(5)), gen(60, generator=_gen(5)))
    assert not torch.equal(gen(60, generator=3), gen(60, generator=4))
    with pytest.raises(ValueError):
        gen(197)
    with pytest.raises(TypeError):
        gen(3, generator="seed")


def test_make_masks_collate_behaviour():
    n, hw = 16, (8, 8)
    masks = make_masks(n, hw, mask_probability=0.5, ratio_min_max=(0.1, 0.5), generator=0)
    assert masks.shape == (16, 64) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert (counts == 0).sum().item() == 8  # half the images unmasked
    masked = sorted(counts[counts > 0].tolist())
    assert len(masked) == 8
    # ratios spread linearly: the i-th masked image has int(64 * U(r_i, r_{i+1}))
    r = np.linspace(0.1, 0.5, 9)
    for i, c in enumerate(masked):
        assert int(64 * r[i]) - 1 <= c <= int(64 * r[i + 1])
    assert torch.equal(masks, make_masks(n, hw, generator=0))
    assert torch.equal(make_masks(n, hw, generator=_gen(1)), make_masks(n, hw, generator=_gen(1)))
    assert make_masks(4, 6, mask_probability=0.0, generator=0).sum() == 0
    with pytest.raises(ValueError):
        make_masks(4, 6, mask_probability=1.5)


# ------------------------------------------------------------------------------------------------
# KoLeo
# ------------------------------------------------------------------------------------------------
def test_koleo_brute_force_and_spread():
    torch.manual_seed(0)
    x = torch.randn(12, 5) * 3
    crit = KoLeoLoss()
    xn = x.double() / x.double().norm(dim=-1, keepdim=True)
    expected = 0.0
    for i in range(12):
        d = [(xn[i] - xn[j]).norm().item() for j in range(12) if j != i]
        expected += -math.log(min(d) + 1e-8)
    expected /= 12
    assert math.isclose(crit(x).item(), expected, rel_tol=1e-5)

    tight = torch.randn(16, 8) * 0.01 + torch.ones(8)
    spread = torch.randn(16, 8)
    assert crit(spread) < crit(tight) - 1.0  # spreading points lowers the loss
    # gradient descent on KoLeo spreads the cluster
    z = tight.clone().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=0.05)
    before = crit(z).item()
    for _ in range(20):
        opt.zero_grad()
        crit(z).backward()
        opt.step()
    assert crit(z).item() < before
    with pytest.raises(ValueError):
        crit(torch.randn(1, 4))
    with pytest.raises(ValueError):
        crit(torch.randn(2, 3, 4))


# ------------------------------------------------------------------------------------------------
# Gram
# ------------------------------------------------------------------------------------------------
def _gram_brute(s, t, remove_neg):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        sn = s[b].double() / s[b].double().norm(dim=-1, keepdim=True)
        tn = t[b].double() / t[b].double().norm(dim=-1, keepdim=True)
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                a, c = (sn[i] @ sn[j]).item(), (tn[i] @ tn[j]).item()
                if remove_neg:
                    a, c = max(a, 0.0), max(c, 0.0)
                total += (a - c) ** 2
                count += 1
    return total / count


def test_gram_loss_properties():
    torch.manual_seed(0)
    B, N, D = 2, 6, 5
    s, t = torch.randn(B, N, D), torch.randn(B, N, D)
    for remove_neg in (True, False):
        loss = GramLoss(remove_neg=remove_neg)(s, t)
        assert math.isclose(loss.item(), _gram_brute(s, t, remove_neg), rel_tol=1e-5)
    crit = GramLoss()
    assert crit(s, s).item() == 0.0
    assert crit(s, s * 3.0).item() < 1e-12  # scale does not matter after normalisation
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))
    Q = Q.float()
    torch.testing.assert_close(crit(s @ Q, t @ Q), crit(s, t), rtol=1e-5, atol=1e-7)
    # batch-level Gram: one (B*N, B*N) matrix
    flat = GramLoss(remove_neg=False, img_level=False)(s, t)
    sn, tn = F.normalize(s.flatten(0, 1), dim=-1), F.normalize(t.flatten(0, 1), dim=-1)
    torch.testing.assert_close(flat, F.mse_loss(sn @ sn.t(), tn @ tn.t()))
    # remove_only_teacher_neg: student entries kept unless both are negative
    g = GramLoss(remove_neg=False, remove_only_teacher_neg=True)(s, t)
    S_, T_ = F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).transpose(1, 2), \
        F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).transpose(1, 2)
    S_ = torch.where((S_ < 0) & (T_ < 0), torch.zeros_like(S_), S_)
    torch.testing.assert_close(g, F.mse_loss(S_, T_.clamp(min=0)))
    with pytest.raises(ValueError):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError):
        crit(torch.randn(6, 5), torch.randn(6, 5))
    with pytest.raises(ValueError):
        crit(s, t[:, :5])


# ------------------------------------------------------------------------------------------------
# EMA and schedules
# ------------------------------------------------------------------------------------------------
def test_update_ema_formula_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student[1].running_mean.fill_(2.0)
    t_before = {n: p.clone() for n, p in teacher.named_parameters()}
    update_ema(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * t_before[n] + 0.1 * dict(student.named_parameters())[n])
        assert not p.requires_grad or p.grad is None
    torch.testing.assert_close(teacher[1].running_mean, torch.full((3,), 2.0))
    snapshot = [p.clone() for p in teacher.parameters()]
    update_ema(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, teacher.parameters()))
    update_ema(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    with pytest.raises(ValueError):
        update_ema(teacher, student, 1.5)
    with pytest.raises(ValueError):
        update_ema(nn.Linear(4, 3), student, 0.5)


def test_schedules_endpoints():
    m = cosine_schedule(0.992, 1.0, 100)
    assert len(m) == 100 and m[0] == 0.992 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
    t = linear_warmup_then_constant(0.04, 0.07, total_steps=50, warmup_steps=10)
    assert len(t) == 50 and t[0] == 0.04 and np.isclose(t[5], 0.055)
    assert np.allclose(t[10:], 0.07) and np.all(np.diff(t[:11]) > 0)
    lr = cosine_schedule(1e-3, 1e-6, 30, warmup_steps=5, start_warmup=0.0)
    assert lr[0] == 0.0 and lr[5] == 1e-3 and np.isclose(lr[-1], 1e-6) and lr.argmax() == 5
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=11)


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------
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


def test_sinkhorn_knopp_cold_teacher_does_not_overflow():
    from dinolab.ssl import sinkhorn_knopp

    logits = torch.tensor([[1.0, -1.0, 0.5], [-0.9, 0.95, 0.2]])
    p = sinkhorn_knopp(logits, 0.005)  # logits / τ = 200: exp overflows float32 without the shift
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    ref = sinkhorn_knopp(logits * 200, 1.0)  # the same logits / τ
    torch.testing.assert_close(p, ref)


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
