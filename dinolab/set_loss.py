"""Set prediction for masks: Hungarian matching and Mask2Former's loss.

A mask-classification model predicts Q (mask, class) pairs for an image with T < Q ground-truth segments. The
loss first decides which prediction answers which segment — the one-to-one assignment of least total cost
(Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``) — then trains each matched prediction towards its
segment and every unmatched one towards "no object".

Matching cost of prediction q for segment t (Mask2Former, Cheng et al. 2022; its ``matcher.py``)::

    C[q, t] = cost_class · (−p_q(class_t)) + cost_mask · BCE(mask_q, mask_t) + cost_dice · dice(mask_q, mask_t)

with p_q the softmax over C+1 classes and BCE / dice computed on ``num_points`` points shared by all predictions
and targets. Loss (its ``criterion.py``): cross-entropy over C+1 classes for every query (the no-object class
weighted ``eos_coef`` = 0.1, matched queries get their segment's class), and for the matched pairs the BCE and dice
of the masks on sampled points, each summed and divided by the number of segments in the batch. With
``aux_outputs`` (deep supervision) the same loss is added for every intermediate prediction, each matched on its own.
Weights in Mask2Former / DINOv3: class 2, mask 5, dice 5, points 112² = 12544, oversample 3, importance 0.75.

Points: the matcher samples uniform random points (as the official). The loss samples, like the official,
``oversample_ratio · N`` random points and keeps the ``importance_sample_ratio · N`` most uncertain of them
(logit closest to 0) plus uniform ones (``importance_sample_ratio=0`` gives uniform points). ``num_points=None``
uses every pixel centre of the prediction grid instead (exact, deterministic: what the tests use).

Targets: a list (one per image) of ``{"labels": [T] int64, "masks": [T, H, W]}`` (any resolution: points are
sampled from both maps in normalised coordinates).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = ["point_sample", "grid_points", "uncertain_points", "batch_sigmoid_ce_loss", "batch_dice_loss",
           "sigmoid_ce_loss", "dice_loss", "HungarianMatcher", "SetCriterion", "M2F_WEIGHTS"]

# Mask2Former's (and DINOv3's M2F) loss weights: class, mask BCE, dice.
M2F_WEIGHTS = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}


# --------------------------------------------------------------------------------------------------- points


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``maps [N, C, H, W]`` at ``coords [N, P, 2]`` ((x, y) in [0, 1]) → ``[N, C, P]``
    (detectron2's ``point_sample``: ``grid_sample`` with align_corners=False, zero outside)."""
    out = F.grid_sample(maps, 2.0 * coords[:, :, None, :] - 1.0, mode="bilinear", align_corners=False)
    return out[..., 0]


def grid_points(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """The ``h·w`` pixel centres of an h×w map as (x, y) in [0, 1]: ``[h·w, 2]`` (row-major)."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


@torch.no_grad()
def uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float = 3.0,
                     importance_sample_ratio: float = 0.75) -> Tensor:
    """PointRend's sampling for mask logits ``[N, 1, H, W]`` → coords ``[N, num_points, 2]``: draw
    ``oversample_ratio · num_points`` uniform points, keep the ``importance_sample_ratio`` share whose logit is
    closest to 0 (most uncertain), fill up with fresh uniform points."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, dtype=logits.dtype)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # [N, num_sampled]
    k = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(k, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(n, num_points - k, 2, device=logits.device, dtype=logits.dtype)
    return torch.cat([chosen, rest], 1)


def _sample_pairs(pred: Tensor, tgt: Tensor, num_points: int | None) -> tuple[Tensor, Tensor]:
    """``pred [Q, 1, h, w]``, ``tgt [T, 1, H, W]`` → values ``[Q, P]``, ``[T, P]`` at the same points: ``num_points``
    uniform random ones, or (None) the pixel centres of the prediction grid — read directly when the target has the
    prediction's size (the same numbers as ``point_sample`` there, without the sampling)."""
    if num_points is None and tgt.shape[-2:] == pred.shape[-2:]:
        return pred.flatten(1), tgt.flatten(1)
    if num_points is None:
        coords = grid_points(*pred.shape[-2:], device=pred.device, dtype=pred.dtype)[None]
    else:
        coords = torch.rand(1, num_points, 2, device=pred.device, dtype=pred.dtype)
    return (point_sample(pred, coords.expand(len(pred), -1, -1))[:, 0],
            point_sample(tgt, coords.expand(len(tgt), -1, -1))[:, 0])


# ---------------------------------------------------------------------------------------------- mask costs


def batch_sigmoid_ce_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean BCE: logits ``[Q, P]`` × targets ``[T, P]`` in [0, 1] → ``[Q, T]``."""
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")  # -log σ(x)
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")  # -log(1-σ(x))
    return (pos @ targets.T + neg @ (1 - targets).T) / inputs.shape[1]


def batch_dice_loss(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss ``1 − (2|p∩t| + 1) / (|p| + |t| + 1)`` with p = sigmoid(logits): ``[Q, P] × [T, P] → [Q, T]``."""
    p = inputs.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Matched pairs ``[M, P]``: mean BCE over points, summed over pairs, divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Matched pairs ``[M, P]``: dice loss summed over pairs, divided by ``num_masks``."""
    p = inputs.sigmoid()
    loss = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return loss.sum() / num_masks


# ------------------------------------------------------------------------------------------------- matcher


class HungarianMatcher(nn.Module):
    """``forward(outputs, targets)`` → per image ``(query indices, target indices)``, int64, sorted by query.

    ``outputs``: ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, h, w]}``. ``num_points``: uniform random
    points per image (official); None: every pixel centre of the prediction grid.
    """

    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int | None = 12544):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all costs can't be 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor) -> Tensor:
        """One image: ``logits [Q, C+1]``, ``masks [Q, h, w]``, ``labels [T]``, ``tgt_masks [T, H, W]`` → ``[Q, T]``."""
        cost_class = -logits.softmax(-1)[:, labels]
        out, tgt = _sample_pairs(masks[:, None].float(), tgt_masks[:, None].float(), self.num_points)
        return (self.cost_mask * batch_sigmoid_ce_loss(out, tgt) + self.cost_class * cost_class
                + self.cost_dice * batch_dice_loss(out, tgt))

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        indices = []
        for b, tgt in enumerate(targets):
            if len(tgt["labels"]) == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            C = self.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], tgt["labels"], tgt["masks"])
            i, j = linear_sum_assignment(C.cpu().numpy())
            indices.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return indices


# ----------------------------------------------------------------------------------------------- criterion


class SetCriterion(nn.Module):
    """Mask2Former's loss (official ``SetCriterion(num_classes, matcher, weight_dict, eos_coef, losses,
    num_points, oversample_ratio, importance_sample_ratio)``; ``losses`` is always labels + masks here).

    ``forward(outputs, targets)`` → dict ``loss_ce, loss_mask, loss_dice`` (+ ``loss_ce_0``, ... for each entry of
    ``outputs["aux_outputs"]``), unweighted; ``total(losses)`` = Σ weight · loss (``weight_dict`` by the name
    without its ``_i`` suffix). The last indices used are kept in ``self.last_indices`` (for figures).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict | None = None,
                 eos_coef: float = 0.1, num_points: int | None = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(M2F_WEIGHTS if weight_dict is None else weight_dict)
        self.eos_coef = eos_coef
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef  # the no-object class counts 10x less
        self.register_buffer("empty_weight", empty_weight)
        self.last_indices = None

    def loss_labels(self, outputs: dict, targets: list[dict], indices) -> Tensor:
        logits = outputs["pred_logits"]  # [B, Q, C+1]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (i, j) in enumerate(indices):
            target_classes[b, i.to(logits.device)] = targets[b]["labels"][j].to(logits.device)
        # weighted mean: Σ w_y · CE / Σ w_y over every query of the batch
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))

    def loss_masks(self, outputs: dict, targets: list[dict], indices, num_masks: float) -> tuple[Tensor, Tensor]:
        pred = torch.cat([outputs["pred_masks"][b, i] for b, (i, _) in enumerate(indices)])[:, None]  # [M, 1, h, w]
        tgt = torch.cat([t["masks"][j] for t, (_, j) in zip(targets, indices)])[:, None].to(pred)  # [M, 1, H, W]
        if len(pred) == 0:
            zero = outputs["pred_masks"].sum() * 0.0
            return zero, zero
        if self.num_points is None:
            point_logits, point_labels = _sample_pairs(pred, tgt, None)
        else:
            coords = uncertain_points(pred.detach(), self.num_points, self.oversample_ratio,
                                      self.importance_sample_ratio)
            point_labels = point_sample(tgt, coords)[:, 0]
            point_logits = point_sample(pred, coords)[:, 0]
        return sigmoid_ce_loss(point_logits, point_labels, num_masks), dice_loss(point_logits, point_labels, num_masks)

    def single(self, outputs: dict, targets: list[dict], num_masks: float) -> tuple[dict, list]:
        """The loss of one set of predictions (matched on its own)."""
        indices = self.matcher(outputs, targets)
        loss_mask, loss_dice = self.loss_masks(outputs, targets, indices, num_masks)
        return {"loss_ce": self.loss_labels(outputs, targets, indices), "loss_mask": loss_mask,
                "loss_dice": loss_dice}, indices

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses, self.last_indices = self.single(outputs, targets, num_masks)
        for k, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses, _ = self.single(aux, targets, num_masks)
            losses.update({f"{name}_{k}": v for name, v in aux_losses.items()})
        return losses

    def total(self, losses: dict) -> Tensor:
        return sum(self.weight_dict[name.rsplit("_", 1)[0] if name[-1].isdigit() else name] * v
                   for name, v in losses.items())
