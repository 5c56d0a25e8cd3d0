"""Tests of dinolab.losses: every objective against its defining property on small tensors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinolab.losses import (
    DINOLoss,
    GramLoss,
    KoLeoLoss,
    iBOTPatchLoss,
    ibot_mask_weights,
    sinkhorn_knopp,
    softmax_center_teacher,
    update_center,
)


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


def test_sinkhorn_knopp_cold_teacher_does_not_overflow():
    from dinolab.losses import sinkhorn_knopp

    logits = torch.tensor([[1.0, -1.0, 0.5], [-0.9, 0.95, 0.2]])
    p = sinkhorn_knopp(logits, 0.005)  # logits / τ = 200: exp overflows float32 without the shift
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    ref = sinkhorn_knopp(logits * 200, 1.0)  # the same logits / τ
    torch.testing.assert_close(p, ref)


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
