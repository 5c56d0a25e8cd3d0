"""Hungarian matching and Mask2Former's set loss: the matcher against brute force over every assignment (costs
recomputed pair by pair), point sampling, and the losses on hand-computed cases."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from dinolab.set_loss import (
    M2F_WEIGHTS,
    HungarianMatcher,
    SetCriterion,
    batch_dice_loss,
    batch_sigmoid_ce_loss,
    grid_points,
    point_sample,
    uncertain_points,
)


def _pair_cost(logit_row, mask, label, tgt, wc=2.0, wm=5.0, wd=5.0):
    """The matching cost of one (prediction, target) pair, written out directly."""
    p = torch.sigmoid(mask.flatten())
    t = tgt.flatten().float()
    bce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return wc * -logit_row.softmax(-1)[label] + wm * bce + wd * dice


@pytest.mark.parametrize("seed", range(5))
def test_matcher_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, T, K, H = 5, 3, 4, 6
    logits = torch.randn(2, Q, K + 1, generator=g, dtype=torch.float64) * 2
    masks = torch.randn(2, Q, H, H, generator=g, dtype=torch.float64) * 3
    targets = [{"labels": torch.randint(0, K, (T - b,), generator=g),
                "masks": torch.rand(T - b, H, H, generator=g) > 0.6} for b in range(2)]
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=None)
    indices = matcher({"pred_logits": logits, "pred_masks": masks}, targets)
    for b, (i, j) in enumerate(indices):
        t = targets[b]
        n = len(t["labels"])
        C = torch.tensor([[_pair_cost(logits[b, q], masks[b, q], t["labels"][k], t["masks"][k]).item()
                           for k in range(n)] for q in range(Q)])
        torch.testing.assert_close(matcher.cost_matrix(logits[b], masks[b], t["labels"], t["masks"]).float(),
                                   C.float(), atol=1e-5, rtol=1e-5)
        best = min(itertools.permutations(range(Q), n), key=lambda qs: sum(C[q, k] for k, q in enumerate(qs)))
        assert len(i) == n and sorted(j.tolist()) == list(range(n))
        got = dict(zip(j.tolist(), i.tolist()))
        assert tuple(got[k] for k in range(n)) == best


def test_empty_image_has_no_match():
    matcher = HungarianMatcher(num_points=None)
    out = {"pred_logits": torch.randn(1, 3, 3), "pred_masks": torch.randn(1, 3, 4, 4)}
    (i, j), = matcher(out, [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 4, 4)}])
    assert len(i) == len(j) == 0


def test_point_sample_at_pixel_centres_is_exact():
    x = torch.randn(3, 2, 5, 7)
    coords = grid_points(5, 7)[None].expand(3, -1, -1)
    torch.testing.assert_close(point_sample(x, coords), x.flatten(2))
    # a target at another resolution is read bilinearly: a 2x nearest-upsampled map gives back the original
    big = F.interpolate(x, scale_factor=2, mode="nearest")
    torch.testing.assert_close(point_sample(big, coords), x.flatten(2))


def test_uncertain_points_prefer_logits_near_zero():
    torch.manual_seed(0)
    logits = torch.linspace(-10, 10, 64).repeat(64, 1)[None, None]  # |logit| small in the middle columns
    coords = uncertain_points(logits, 100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 100, 2)
    chosen = point_sample(logits, coords)[0, 0]
    assert chosen[:75].abs().mean() < 0.5 * chosen[75:].abs().mean()  # importance part vs the uniform rest


def test_pairwise_costs_hand_case():
    logits = torch.tensor([[0.0, 0.0], [20.0, -20.0]])  # q0: p = 0.5 everywhere; q1: pixel 0 on, pixel 1 off
    targets = torch.tensor([[1.0, 0.0]])
    bce = batch_sigmoid_ce_loss(logits, targets)
    torch.testing.assert_close(bce, torch.tensor([[math.log(2)], [0.0]]), atol=1e-6, rtol=0)
    dice = batch_dice_loss(logits, targets)
    torch.testing.assert_close(dice, torch.tensor([[1 - 2 / 3], [0.0]]), atol=1e-6, rtol=0)  # q0: 1-(1+1)/(1+1+1)


def test_criterion_hand_case():
    """One image, 2 queries, 2 classes, one target (class 1) on the left half of a 2x2 map."""
    big = 20.0
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, big]]])  # q0 uncertain, q1 sure "no object"
    masks = torch.zeros(1, 2, 2, 2)  # every mask logit 0: p = 0.5
    masks[0, 1] = -big
    target = [{"labels": torch.tensor([1]), "masks": torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])}]
    crit = SetCriterion(2, HungarianMatcher(2.0, 5.0, 5.0, num_points=None), eos_coef=0.1, num_points=None)
    losses = crit({"pred_logits": logits, "pred_masks": masks}, target)
    assert crit.last_indices[0][0].tolist() == [0]  # q0 matches (q1 is sure there is nothing)
    ce_q1 = -torch.log_softmax(logits[0, 1], -1)[2]
    torch.testing.assert_close(losses["loss_ce"], (math.log(3) + 0.1 * ce_q1) / 1.1)
    torch.testing.assert_close(losses["loss_mask"], torch.tensor(math.log(2)))
    torch.testing.assert_close(losses["loss_dice"], torch.tensor(1 - (2 * 1.0 + 1) / (2.0 + 2.0 + 1)))
    total = crit.total(losses)
    expect = sum(M2F_WEIGHTS[k] * v for k, v in losses.items())
    torch.testing.assert_close(total, expect)


def test_deep_supervision_and_gradients():
    torch.manual_seed(0)
    out = {"pred_logits": torch.randn(2, 4, 4, requires_grad=True), "pred_masks": torch.randn(2, 4, 8, 8, requires_grad=True)}
    out["aux_outputs"] = [{"pred_logits": out["pred_logits"] * 1.0, "pred_masks": out["pred_masks"] * 1.0}
                          for _ in range(2)]
    targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 32, 32) > 0.5},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, 32, 32) > 0.5}]
    crit = SetCriterion(3, HungarianMatcher(2.0, 5.0, 5.0, num_points=64), num_points=64)
    losses = crit(out, targets)
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    torch.manual_seed(1)
    crit.total(losses).backward()
    assert out["pred_logits"].grad.abs().sum() > 0 and out["pred_masks"].grad.abs().sum() > 0
    # identical aux predictions with exact (grid) points give identical losses
    exact = SetCriterion(3, HungarianMatcher(num_points=None), num_points=None)
    l2 = exact({k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}, targets)
    for n in ("ce", "mask", "dice"):
        torch.testing.assert_close(l2[f"loss_{n}"], l2[f"loss_{n}_0"])
