"""dinolab.train: the fit loop (schedule, batch sources, modes, errors), the feature cache, and every metric
against values computed by hand on tiny tensors. CPU, seconds."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dinolab.train import (
    absrel,
    accuracy,
    boundaries,
    boundary_fscore,
    confusion_matrix,
    cosine_schedule,
    delta1,
    extract_features,
    fit,
    miou,
    rmse,
)
from dinolab.vit import DinoVisionTransformer

# ------------------------------------------------------------------------------------------------------ fit


def test_cosine_schedule_values():
    assert [cosine_schedule(s, 10, warmup=2) for s in (0, 1)] == [0.5, 1.0]
    assert cosine_schedule(2, 10, warmup=2) == 1.0
    assert cosine_schedule(6, 10, warmup=2) == pytest.approx(0.5)  # halfway through the cosine
    assert cosine_schedule(10, 10, warmup=2) == pytest.approx(0.0)
    assert cosine_schedule(10, 10, warmup=0, min_factor=0.1) == pytest.approx(0.1)


def _regression():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    model = nn.Linear(4, 1)

    def loss_fn(m, batch):
        xb, yb = batch
        return ((m(xb).squeeze(1) - yb) ** 2).mean()

    return model, loss_fn, x, y


def test_fit_reduces_loss_and_returns_history(capsys):
    model, loss_fn, x, y = _regression()
    model.eval()
    hist = fit(model, None, loss_fn, [(x, y)], steps=60, lr=0.1, weight_decay=0.0, warmup=5, progress=False)
    assert len(hist) == 60 and all(isinstance(h, float) for h in hist)
    assert hist[-1] < 0.05 * hist[0]
    assert not model.training  # previous mode restored
    assert capsys.readouterr().out == ""  # no bar, no logs


def test_fit_batch_sources_and_logging(capsys):
    model, loss_fn, x, y = _regression()
    # a list is cycled
    assert len(fit(model, model.parameters(), loss_fn, [(x[:32], y[:32]), (x[32:], y[32:])], steps=5,
                   progress=False)) == 5
    # a callable step -> batch
    seen = []

    def get(step):
        seen.append(step)
        return x, y

    fit(model, None, loss_fn, get, steps=4, progress=False, log_every=2)
    assert seen == [0, 1, 2, 3]
    out = capsys.readouterr()
    assert "step     2/4" in out.out + out.err and "step     4/4" in out.out + out.err
    # an iterator that runs out ends training early
    gen = ((x, y) for _ in range(3))
    assert len(fit(model, None, loss_fn, gen, steps=10, progress=False)) == 3


def test_fit_only_given_params_move_and_lr_decays():
    model, loss_fn, x, y = _regression()
    bias0 = model.bias.detach().clone()
    opt_params = [model.weight]
    fit(model, opt_params, loss_fn, [(x, y)], steps=3, lr=0.1, progress=False)
    assert torch.equal(model.bias, bias0)


def test_fit_errors():
    model, loss_fn, x, y = _regression()
    with pytest.raises(FloatingPointError, match="step 0"):
        fit(model, None, lambda m, b: torch.tensor(float("nan"), requires_grad=True), [(x, y)], steps=2,
            progress=False)
    with pytest.raises(ValueError, match="steps"):
        fit(model, None, loss_fn, [(x, y)], steps=0, progress=False)
    with pytest.raises(ValueError, match="no parameters"):
        fit(model, [], loss_fn, [(x, y)], steps=1, progress=False)


def test_fit_progress_bar_can_run():
    model, loss_fn, x, y = _regression()
    assert len(fit(model, None, loss_fn, [(x, y)], steps=3, progress=True)) == 3


# ------------------------------------------------------------------------------------------- feature cache


def _tiny_vit():
    torch.manual_seed(0)
    m = DinoVisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, n_storage_tokens=2)
    m.init_weights()
    return m


def test_extract_features_matches_one_big_batch():
    vit = _tiny_vit().train()
    imgs = torch.rand(5, 3, 32, 48)
    feats = extract_features(vit, imgs, layers=[0, 2], batch_size=2)
    assert vit.training  # mode restored
    vit.eval()
    with torch.no_grad():
        ref = vit.get_intermediate_layers(imgs, n=[0, 2], reshape=True, return_class_token=True)
    assert len(feats) == 2
    for (p, c), (pr, cr) in zip(feats, ref):
        assert p.shape == (5, 32, 2, 3) and c.shape == (5, 32) and not p.requires_grad
        torch.testing.assert_close(p, pr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c, cr, atol=1e-5, rtol=1e-5)
    # patch tokens only, last block; ImageNet normalisation applied first when asked
    only = extract_features(vit, imgs, layers=1, return_class_token=False, batch_size=4)
    assert len(only) == 1 and only[0].shape == (5, 32, 2, 3)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    normed = extract_features(vit, imgs, normalize=True)
    plain = extract_features(vit, (imgs - mean) / std)
    torch.testing.assert_close(normed[0][0], plain[0][0], atol=1e-5, rtol=1e-5)


def test_extract_features_from_a_dataset():
    class DS:
        def __init__(self, imgs):
            self.imgs = imgs

        def __len__(self):
            return len(self.imgs)

        def batch(self, idx):
            return {"image": self.imgs[idx]}

    vit = _tiny_vit()
    imgs = torch.rand(3, 3, 32, 32)
    a = extract_features(vit, DS(imgs), batch_size=2)
    b = extract_features(vit, imgs, batch_size=3)
    torch.testing.assert_close(a[0][0], b[0][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        extract_features(vit, [imgs])


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
