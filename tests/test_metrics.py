"""dinolab.metrics: every metric against values computed by hand on tiny tensors. CPU, seconds."""
from __future__ import annotations

import math

import pytest
import torch

from dinolab.metrics import absrel, accuracy, boundaries, boundary_fscore, confusion_matrix, delta1, miou, rmse

# ------------------------------------------------------------------------------------ classification / seg

PRED = torch.tensor([[0, 0, 1], [1, 2, 2]])
TARGET = torch.tensor([[0, 1, 1], [1, 2, 0]])


def test_accuracy_by_hand():
    assert accuracy(PRED, TARGET) == pytest.approx(4 / 6)
    logits = torch.nn.functional.one_hot(PRED, 3).permute(2, 0, 1).float()[None]  # [1, 3, 2, 3]
    assert accuracy(logits, TARGET[None]) == pytest.approx(4 / 6)
    t = TARGET.clone()
    t[0, 1] = 255  # the one wrong pixel (0 vs 1) in the first row is ignored
    assert accuracy(PRED, t, ignore_index=255) == pytest.approx(4 / 5)
    assert accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])) == 0.5


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(PRED, TARGET, 4)
    # rows = true class, columns = predicted
    expected = torch.tensor([[1, 0, 1, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(PRED, TARGET, 2)


def test_miou_by_hand():
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 2, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 1/2;
    # class 3: in neither -> skipped (official nanmean). mIoU = (1/3 + 2/3 + 1/2) / 3 = 0.5
    m, iou = miou(PRED, TARGET, 4, per_class=True)
    assert m == pytest.approx(0.5)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])
    # a class only in the prediction counts (IoU 0)
    assert miou(torch.tensor([3, 1]), torch.tensor([0, 1]), 4) == pytest.approx((0 + 1 + 0) / 3)
    # ignore_index drops the pixel (pred 2, target 0): class 0: TP 1, FP 1 -> 1/2; class 1: 2/3; class 2: TP 1 -> 1
    t = TARGET.clone()
    t[1, 2] = 255
    assert miou(PRED, t, 4, ignore_index=255) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert miou(PRED, PRED, 3) == 1.0


def test_boundaries_by_hand():
    lab = torch.tensor([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    expected = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(boundaries(lab), expected)
    assert not boundaries(torch.zeros(3, 4, dtype=torch.long)).any()


def test_boundary_fscore_by_hand():
    # 4×4, target: left half 0 / right half 1 -> boundary columns 1 and 2 (8 pixels)
    target = torch.zeros(4, 4, dtype=torch.long)
    target[:, 2:] = 1
    # prediction shifted right by one: boundary columns 2 and 3
    pred = torch.zeros(4, 4, dtype=torch.long)
    pred[:, 3:] = 1
    # tolerance 0: matched predicted = column 2 (4 of 8) -> P = 0.5; matched true = column 2 -> R = 0.5
    f, p, r = boundary_fscore(pred, target, tolerance_px=0, return_pr=True)
    assert (f, p, r) == (0.5, 0.5, 0.5)
    assert boundary_fscore(pred, target, tolerance_px=1) == 1.0  # a one-pixel shift is within tolerance
    assert boundary_fscore(target, target, tolerance_px=0) == 1.0
    flat = torch.zeros(4, 4, dtype=torch.long)
    assert boundary_fscore(flat, flat) == 1.0
    assert boundary_fscore(flat, target) == 0.0 and boundary_fscore(target, flat) == 0.0
    # batched input pools the pixels of all images: (4 + 8) matched of (8 + 8) each way -> 0.75
    f2 = boundary_fscore(torch.stack([pred, target]), torch.stack([target, target]), tolerance_px=0)
    assert f2 == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------------- depth


def test_depth_metrics_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0, 9.0])
    gt = torch.tensor([1.0, 1.0, 4.0, 5.0, 0.0])  # gt = 0: never valid
    # valid: first four. |e|/gt = 0, 1, 1/4, 1/5 -> 1.45 / 4
    assert absrel(pred, gt) == pytest.approx(1.45 / 4)
    # squared errors 0, 1, 1, 1 -> sqrt(3/4)
    assert rmse(pred, gt) == pytest.approx(math.sqrt(0.75))
    # max ratios 1, 2, 4/3, 5/4 -> only the first is < 1.25 (1.25 itself is not)
    assert delta1(pred, gt) == pytest.approx(0.25)
    assert delta1(pred, gt, threshold=1.25**2) == pytest.approx(0.75)
    valid = torch.tensor([True, False, True, True, True])
    assert absrel(pred, gt, valid) == pytest.approx(0.45 / 3)
    assert rmse(pred, gt, valid) == pytest.approx(math.sqrt(2 / 3))
    assert delta1(pred, gt, valid) == pytest.approx(1 / 3)
    # a [B, 1, H, W] prediction against a [B, H, W] target
    assert absrel(pred.view(1, 1, 1, 5), gt.view(1, 1, 5)) == pytest.approx(1.45 / 4)
    with pytest.raises(ValueError, match="no valid pixels"):
        rmse(pred, gt, torch.zeros(5, dtype=torch.bool))
