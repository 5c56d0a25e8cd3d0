"""Panoptic segmentation from mask-classification outputs, and the panoptic quality (PQ) that scores it.

* :func:`panoptic_inference`: Mask2Former's ``panoptic_inference`` (``mask2former/maskformer_model.py``) for one
  image: keep the queries whose best class is not "no object" and whose score exceeds ``object_mask_threshold``,
  give each pixel to the kept query with the largest ``score · sigmoid(mask)``, drop segments that keep less than
  ``overlap_threshold`` of their own mask (sigmoid ≥ 0.5), and merge the segments of one stuff class.
* :func:`panoptic_quality`: PQ of Kirillov et al. 2019 (the COCO panoptic metric, without void or crowd
  regions, which ShapesWorld does not have). A predicted and a true segment of the same class match when their
  IoU > 0.5 (such a match is unique); per class ``PQ = Σ_TP IoU / (TP + FP/2 + FN/2) = SQ · RQ``, averaged over
  the classes that occur in the predictions or the ground truth.

A segmentation is ``(seg [H, W] int64, classes {segment id: class})`` with id 0 = no segment.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["panoptic_inference", "segments_from_instances", "panoptic_quality"]


@torch.no_grad()
def panoptic_inference(pred_logits: Tensor, pred_masks: Tensor, thing_classes, object_mask_threshold: float = 0.8,
                       overlap_threshold: float = 0.8) -> tuple[Tensor, dict[int, int]]:
    """One image: ``pred_logits [Q, C+1]``, ``pred_masks [Q, H, W]`` (logits, at the output size) →
    ``(seg [H, W] int64, {segment id: class})``."""
    num_classes = pred_logits.shape[-1] - 1
    scores, labels = pred_logits.softmax(-1).max(-1)
    masks = pred_masks.sigmoid()
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], masks[keep]
    seg = torch.zeros(pred_masks.shape[-2:], dtype=torch.int64, device=pred_masks.device)
    classes: dict[int, int] = {}
    if len(labels) == 0:
        return seg, classes
    owner = (scores[:, None, None] * masks).argmax(0)  # which kept query wins each pixel
    stuff_ids: dict[int, int] = {}
    things = {int(c) for c in thing_classes}
    for k in range(len(labels)):
        c = int(labels[k])
        mine = owner == k
        original = masks[k] >= 0.5
        region = mine & original
        mask_area, original_area = int(mine.sum()), int(original.sum())
        if mask_area == 0 or original_area == 0 or int(region.sum()) == 0:
            continue
        if mask_area / original_area < overlap_threshold:  # mostly covered by others: drop
            continue
        if c not in things and c in stuff_ids:  # one segment per stuff class
            seg[region] = stuff_ids[c]
            continue
        sid = len(classes) + 1
        if c not in things:
            stuff_ids[c] = sid
        seg[region] = sid
        classes[sid] = c
    return seg, classes


def segments_from_instances(semantic: Tensor, instance_masks: Tensor, labels: Tensor,
                            stuff_classes=(0,)) -> tuple[Tensor, dict[int, int]]:
    """Ground truth as a segmentation: one segment per stuff class present in ``semantic [H, W]`` and one per
    instance (``instance_masks [T, H, W]`` bool with ``labels [T]``, rows with label 0 skipped)."""
    seg = torch.zeros(semantic.shape, dtype=torch.int64, device=semantic.device)
    classes: dict[int, int] = {}
    for c in stuff_classes:
        region = semantic == c
        if region.any():
            classes[len(classes) + 1] = int(c)
            seg[region] = len(classes)
    for m, c in zip(instance_masks, labels.tolist()):
        if c > 0 and m.any():
            classes[len(classes) + 1] = int(c)
            seg[m] = len(classes)
    return seg, classes


def panoptic_quality(preds: list, targets: list, num_classes: int) -> dict:
    """PQ, SQ, RQ over a dataset. ``preds`` and ``targets``: lists of ``(seg, classes)`` (see the module doc).

    Returns ``{"pq", "sq", "rq", "per_class": {class: (pq, tp, fp, fn)}}`` (means over classes with
    TP + FP + FN > 0)."""
    tp = [0] * num_classes
    fp = [0] * num_classes
    fn = [0] * num_classes
    iou_sum = [0.0] * num_classes
    for (ps, pc), (gs, gc) in zip(preds, targets):
        matched_p, matched_g = set(), set()
        for g, cg in gc.items():
            gmask = gs == g
            for p, cp in pc.items():
                if cp != cg or p in matched_p:
                    continue
                pmask = ps == p
                inter = int((gmask & pmask).sum())
                iou = inter / max(int((gmask | pmask).sum()), 1)
                if iou > 0.5:  # at most one such p per g, since segments do not overlap
                    tp[cg] += 1
                    iou_sum[cg] += iou
                    matched_p.add(p)
                    matched_g.add(g)
                    break
        for g, cg in gc.items():
            fn[cg] += g not in matched_g
        for p, cp in pc.items():
            fp[cp] += p not in matched_p
    per_class, pqs, sqs, rqs = {}, [], [], []
    for c in range(num_classes):
        if tp[c] + fp[c] + fn[c] == 0:
            continue
        sq = iou_sum[c] / tp[c] if tp[c] else 0.0
        rq = tp[c] / (tp[c] + 0.5 * fp[c] + 0.5 * fn[c])
        per_class[c] = (sq * rq, tp[c], fp[c], fn[c])
        pqs.append(sq * rq)
        sqs.append(sq)
        rqs.append(rq)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"pq": mean(pqs), "sq": mean(sqs), "rq": mean(rqs), "per_class": per_class}
