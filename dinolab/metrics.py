"""Metrics for the notebooks' evaluations, on label maps and depth maps (plain torch, any device).

* classification / segmentation: :func:`accuracy`, :func:`confusion_matrix`, :func:`miou` (the official
  ``nanmean`` of intersect / union), :func:`boundaries`, :func:`boundary_fscore`;
* depth: :func:`absrel`, :func:`rmse`, :func:`delta1`, as the official ``calculate_depth_metrics``
  (``dinov3/eval/depth/metrics.py``).

Predictions may be logits (argmaxed over dim 1) or labels; the training loops are in :mod:`dinolab.train`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["accuracy", "confusion_matrix", "miou", "boundaries", "boundary_fscore", "absrel", "rmse", "delta1"]


# ---------------------------------------------------------------------------------------------------------------
# Classification / segmentation metrics
# ---------------------------------------------------------------------------------------------------------------


def _labels(pred: Tensor, target: Tensor) -> Tensor:
    """Logits [B, C, ...] (one more dim than target, floating) → argmax over dim 1; labels pass through."""
    if pred.dim() == target.dim() + 1 and pred.is_floating_point():
        pred = pred.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    return pred


def accuracy(logits_or_pred: Tensor, target: Tensor, ignore_index: int | None = None) -> float:
    """Fraction of correct labels (logits are argmaxed over dim 1); pixels with ``ignore_index`` don't count."""
    pred = _labels(logits_or_pred, target)
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    n = int(keep.sum())
    return float((pred[keep] == target[keep]).sum()) / n if n else float("nan")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """[num_classes, num_classes] int64 counts: row = true class, column = predicted class.

    Pixels whose target is ``ignore_index`` are skipped; any other target or prediction outside
    [0, num_classes) is an error. ``pred`` may be logits [B, C, ...].
    """
    pred = _labels(pred, target).reshape(-1).long()
    target = target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, t in (("target", target), ("pred", pred)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes}): min {int(t.min())}, max {int(t.max())}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)


def miou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None,
         per_class: bool = False):
    """Mean intersection-over-union.

    IoU_c = TP / (TP + FP + FN) from the confusion matrix pooled over every pixel given (so call it once on the
    whole evaluation set, or accumulate :func:`confusion_matrix`). The mean is over the classes that occur in
    the target **or** the prediction (union > 0); classes absent from both are NaN and skipped — the official
    ``nanmean`` of ``intersect / union``. ``per_class=True`` returns ``(miou, iou [num_classes] with NaNs)``.
    """
    cm = confusion_matrix(pred, target, num_classes, ignore_index).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    m = float(iou.nanmean()) if bool((union > 0).any()) else float("nan")
    return (m, iou) if per_class else m


def boundaries(labels: Tensor) -> Tensor:
    """Boundary pixels of a label map [H, W] or [B, H, W]: pixels whose label differs from one of their 4
    neighbours (both pixels of a differing pair are boundary pixels). Returns a bool tensor of the same shape."""
    squeeze = labels.dim() == 2
    lab = labels[None] if squeeze else labels
    b = torch.zeros_like(lab, dtype=torch.bool)
    dy = lab[:, 1:, :] != lab[:, :-1, :]
    dx = lab[:, :, 1:] != lab[:, :, :-1]
    b[:, 1:, :] |= dy
    b[:, :-1, :] |= dy
    b[:, :, 1:] |= dx
    b[:, :, :-1] |= dx
    return b[0] if squeeze else b


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Square dilation (Chebyshev distance ≤ radius) of a bool [B, H, W] mask by max-pooling."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)[:, 0] > 0


def boundary_fscore(pred: Tensor, target: Tensor, tolerance_px: int = 2, return_pr: bool = False):
    """Boundary F-score: how well the predicted label boundaries line up with the true ones.

    Boundaries as in :func:`boundaries`. A predicted boundary pixel is correct if a true boundary pixel lies
    within ``tolerance_px`` (Chebyshev distance, i.e. in the (2t+1)² square around it: max-pool dilation), and
    vice versa. precision = matched predicted / predicted, recall = matched true / true, F = 2PR / (P + R),
    counted over all pixels given (images pooled). An empty set counts as fully matched (P = 1 with no predicted
    boundary, R = 1 with no true one), so: no boundaries in both → 1.0; in only one of them → 0.0.
    ``pred`` may be logits [B, C, H, W]. ``return_pr=True`` returns ``(F, precision, recall)``.
    """
    pred = _labels(pred, target)
    if pred.dim() == 2:
        pred, target = pred[None], target[None]
    bp, bt = boundaries(pred), boundaries(target)
    n_p, n_t = int(bp.sum()), int(bt.sum())
    # an empty set is vacuously all-matched: no predicted boundary → precision 1, no true boundary → recall 1
    p = int((bp & _dilate(bt, tolerance_px)).sum()) / n_p if n_p else 1.0
    r = int((bt & _dilate(bp, tolerance_px)).sum()) / n_t if n_t else 1.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return (f, p, r) if return_pr else f


# ---------------------------------------------------------------------------------------------------------------
# Depth metrics (official dinov3/eval/depth/metrics.py: abs_rel, rmse, a1)
# ---------------------------------------------------------------------------------------------------------------


def _depth_pairs(pred: Tensor, target: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    if pred.dim() == target.dim() + 1 and pred.shape[1] == 1:
        pred = pred.squeeze(1)  # [B, 1, H, W] prediction vs [B, H, W] target
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    keep = target > 0  # official: valid_mask & (gt > 0)
    if valid is not None:
        keep = keep & valid.reshape(target.shape).bool()
    if not bool(keep.any()):
        raise ValueError("no valid pixels (valid mask and gt > 0)")
    return pred[keep].double(), target[keep].double()


def absrel(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> float:
    """Mean absolute relative error ``mean(|pred − gt| / gt)`` over valid pixels (``valid`` and gt > 0)."""
    p, t = _depth_pairs(pred, target, valid)
    return float(((p - t).abs() / t).mean())


def rmse(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> float:
    """Root mean squared error ``sqrt(mean((pred − gt)²))`` over valid pixels, in the depth unit (metres)."""
    p, t = _depth_pairs(pred, target, valid)
    return float(((p - t) ** 2).mean().sqrt())


def delta1(pred: Tensor, target: Tensor, valid: Tensor | None = None, threshold: float = 1.25) -> float:
    """δ1: fraction of valid pixels with ``max(pred/gt, gt/pred) < 1.25`` (``threshold``: 1.25² and 1.25³ give
    δ2 and δ3)."""
    p, t = _depth_pairs(pred, target, valid)
    return float((torch.maximum(p / t, t / p) < threshold).double().mean())
