"""Detection as set prediction: DETR's matching and losses, Plain-DETR's hybrid matching, a tiny detector on
frozen features, and COCO-style average precision.

Official pointers: ``dinov3/eval/detection/`` (Plain-DETR, Lin et al. 2023: ``models/detr.py``,
``util/box_ops.py``, ``models/windows.py``, ``models/backbone.py``) and DETR (Carion et al. 2020,
``facebookresearch/detr``: ``models/matcher.py``, ``models/detr.py::SetCriterion``).

* Boxes are ``(cx, cy, w, h)`` normalised to [0, 1] inside the model and ``(x0, y0, x1, y1)`` for IoU.
* :class:`HungarianMatcher`: cost = ``cost_class · (−p(class)) + cost_bbox · L1 + cost_giou · (−GIoU)``
  (DETR's weights 1, 5, 2), solved per image with ``scipy.optimize.linear_sum_assignment``.
* :class:`SetCriterion`: cross-entropy with the no-object class weighted ``eos_coef`` (0.1), L1 and 1 − GIoU on
  matched boxes, each summed over the batch and divided by the number of boxes; the same for ``aux_outputs``.
  (Plain-DETR and DINOv3's detector use a sigmoid focal loss without a no-object class instead; the idea is the
  same.)
* Hybrid matching (Plain-DETR, from H-DETR): an extra group of queries is matched to the ground truth repeated
  ``k`` times (:func:`one2many_targets`), so many queries learn from each object; the groups cannot see each
  other (``self_attn_mask``), and only the one-to-one group is used at inference.
* :class:`TinyDETR`: input projection (1×1 conv + GroupNorm) of a stride-16 feature map, sine positions, a
  pre-norm decoder (self-attention, cross-attention, FFN) of learned queries or, ``two_stage=True``, of the feature
  tokens themselves, each proposing a box around its cell; class and box heads after every layer. Plain-DETR adds a
  transformer encoder, top-k proposals from a supervised proposal head, box refinement and relative position bias.
* :func:`window_features`: the official detector's backbone features (4 layers concatenated, a 3×3 / 2×2 window
  split plus a resized global view, stacked: ``[B, 2·4·D, H/16, W/16]``).
* :func:`batched_window_features` runs it over a set of images in batches; :func:`scene_targets` turns ShapesWorld's
  boxes into detection targets (the five shape classes, background boxes dropped).
* :func:`average_precision`: COCO's AP (``pycocotools`` ``COCOeval``, bbox, area "all", 100 detections per image,
  101 recall points), AP@0.5 and AP@[.5:.95].
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .mask2former import MLP, CrossAttentionLayer, FFNLayer, SelfAttentionLayer
from .position_encoding import PositionEmbeddingSine
from .utils import normalize

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou", "generalized_box_iou",
           "HungarianMatcher", "SetCriterion", "one2many_targets", "hybrid_loss", "TinyDETR", "post_process",
           "window_features", "batched_window_features", "scene_targets", "average_precision"]


# ------------------------------------------------------------------------------------------------ boxes


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes ``[N, 4] × [M, 4]`` → ``(iou [N, M], union [N, M])``."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU = IoU − (|C| − |A ∪ B|) / |C|, C the smallest box enclosing both: ``[N, M]`` in [−1, 1]."""
    if not ((boxes1[:, 2:] >= boxes1[:, :2]).all() and (boxes2[:, 2:] >= boxes2[:, :2]).all()):
        raise ValueError("boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


# ------------------------------------------------------------------------------------ matching and loss


class HungarianMatcher(nn.Module):
    """DETR's matcher. ``outputs``: ``{"pred_logits": [B, Q, C+1], "pred_boxes": [B, Q, 4]}`` (cxcywh in [0, 1]);
    ``targets``: per image ``{"labels": [T], "boxes": [T, 4]}`` (cxcywh). → per image (query idx, target idx)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        cost_class = -logits.softmax(-1)[:, labels]
        cost_bbox = torch.cdist(boxes, tgt_boxes.to(boxes), p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes.to(boxes)))
        return self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        # as DETR: one cost matrix for the whole batch [B, Q, ΣT], then one assignment per image on its own columns
        B, Q = outputs["pred_logits"].shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        labels = torch.cat([t["labels"] for t in targets]).to(outputs["pred_logits"].device)
        boxes = torch.cat([t["boxes"] for t in targets])
        C = self.cost_matrix(outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1), labels, boxes)
        C = C.view(B, Q, -1).cpu()
        out = []
        for b, c in enumerate(C.split(sizes, -1)):
            i, j = linear_sum_assignment(c[b].numpy()) if sizes[b] else ([], [])
            out.append((torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)))
        return out


class SetCriterion(nn.Module):
    """DETR's loss: ``loss_ce`` (no-object weight ``eos_coef``), ``loss_bbox`` (L1), ``loss_giou``, plus
    ``_i``-suffixed copies for ``aux_outputs``. ``total(losses)`` weights them with ``weight_dict``."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict | None = None,
                 eos_coef: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict or {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def single(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict:
        indices = self.matcher(outputs, targets)
        logits = outputs["pred_logits"]
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (i, j) in enumerate(indices):
            target_classes[b, i] = targets[b]["labels"][j].to(logits.device)
        loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.dtype))
        src = torch.cat([outputs["pred_boxes"][b, i] for b, (i, _) in enumerate(indices)])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}

    def forward(self, outputs: dict, targets: list[dict]) -> dict:
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self.single(outputs, targets, num_boxes)
        for k, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{n}_{k}": v for n, v in self.single(aux, targets, num_boxes).items()})
        return losses

    def total(self, losses: dict) -> Tensor:
        return sum(self.weight_dict[n.rsplit("_", 1)[0] if n[-1].isdigit() else n] * v for n, v in losses.items())


def one2many_targets(targets: list[dict], k: int) -> list[dict]:
    """Plain-DETR's one-to-many targets: every ground-truth object repeated ``k`` times."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]


def hybrid_loss(criterion: "SetCriterion", outputs: dict, targets: list[dict], k: int) -> Tensor:
    """Plain-DETR's hybrid matching loss: the set loss of the one-to-one queries against ``targets``, plus, when the
    model has a one-to-many group (``pred_logits_one2many`` in ``outputs``), the same loss of that group against the
    targets repeated ``k`` times (``one2many_targets``)."""
    loss = criterion.total(criterion(outputs, targets))
    if "pred_logits_one2many" in outputs:
        many = {"pred_logits": outputs["pred_logits_one2many"], "pred_boxes": outputs["pred_boxes_one2many"],
                "aux_outputs": outputs["aux_outputs_one2many"]}
        loss = loss + criterion.total(criterion(many, one2many_targets(targets, k)))
    return loss


# -------------------------------------------------------------------------------------------- detector


class TinyDETR(nn.Module):
    """A small DETR-style detector on a frozen ``[B, in_channels, h, w]`` feature map (stride 16).

    Queries (``two_stage=False``, DETR): ``num_queries_one2one`` learned content (``query_feat``) and position
    (``query_embed``) vectors; boxes are predicted directly (sigmoid of the box head). ``two_stage=True`` (the idea of
    Plain-DETR's two-stage proposals, simplified): every feature token is a query — its projected feature as content
    (plus a learned per-group vector), its sine position as position — and proposes the box of side two tokens around
    its own cell; the decoder predicts a correction (``box = sigmoid(logit(reference) + delta)``). Plain-DETR keeps
    only the top-k proposals, scored by a supervised proposal head, and refines the box layer by layer.

    ``num_queries_one2many > 0`` adds, in training, the one-to-many group (learned queries: that many; two-stage: a
    second copy of the token queries). ``forward(features)`` → ``{"pred_logits": [B, Q1, C+1], "pred_boxes":
    [B, Q1, 4] (cxcywh in [0, 1]), "aux_outputs": [...]}``, plus ``pred_logits_one2many`` / ``pred_boxes_one2many`` /
    ``aux_outputs_one2many`` for that group.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden_dim: int = 256, num_queries_one2one: int = 100,
                 num_queries_one2many: int = 0, dec_layers: int = 6, nheads: int = 8, dim_feedforward: int = 1024,
                 two_stage: bool = False):
        super().__init__()
        self.num_queries_one2one = num_queries_one2one
        self.num_queries_one2many = num_queries_one2many
        self.two_stage = two_stage
        self.input_proj = nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
                                        nn.GroupNorm(32, hidden_dim))
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        if two_stage:  # one learned vector per query group, added to the token features
            self.query_feat = nn.Embedding(2, hidden_dim)
            nn.init.zeros_(self.query_feat.weight)
        else:
            n = num_queries_one2one + num_queries_one2many
            self.query_feat = nn.Embedding(n, hidden_dim)
            self.query_embed = nn.Embedding(n, hidden_dim)
        self.self_attn_layers = nn.ModuleList(SelfAttentionLayer(hidden_dim, nheads, normalize_before=True)
                                              for _ in range(dec_layers))
        self.cross_attn_layers = nn.ModuleList(CrossAttentionLayer(hidden_dim, nheads, normalize_before=True)
                                               for _ in range(dec_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward, normalize_before=True)
                                        for _ in range(dec_layers))
        self.norm = nn.LayerNorm(hidden_dim)  # pre-norm: one final norm before the heads
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)  # start at the reference box / a centred box
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if not two_stage:  # a box at the centre, a quarter of the image
            with torch.no_grad():
                self.bbox_embed.layers[-1].bias[2:] = math.log(0.25 / 0.75)

    def self_attn_mask(self, n: int, device, num_one2one: int | None = None) -> Tensor:
        """``[n, n]`` bool, True = blocked: the one-to-one and one-to-many groups cannot see each other."""
        q1 = self.num_queries_one2one if num_one2one is None else num_one2one
        mask = torch.zeros(n, n, dtype=torch.bool, device=device)
        mask[q1:, :q1] = True
        mask[:q1, q1:] = True
        return mask

    @staticmethod
    def reference_boxes(h: int, w: int, device=None) -> Tensor:
        """``[h·w, 4]`` cxcywh: a box of side two tokens centred on every token's cell (row-major)."""
        ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w,
                                indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten(), torch.full_like(xs.flatten(), min(2 / w, 0.99)),
                            torch.full_like(ys.flatten(), min(2 / h, 0.99))], -1)

    def forward(self, features: Tensor) -> dict:
        B = features.shape[0]
        memory = self.input_proj(features)
        h, w = memory.shape[-2:]
        pos = self.pe_layer(memory).to(memory.dtype).flatten(2).permute(2, 0, 1)  # [hw, B, C]
        memory = memory.flatten(2).permute(2, 0, 1)
        many = self.training and self.num_queries_one2many > 0
        if self.two_stage:
            q1, groups = h * w, 2 if many else 1
            tgt = torch.cat([memory + self.query_feat.weight[g] for g in range(groups)])
            query_pos = pos.repeat(groups, 1, 1)
            reference = torch.logit(self.reference_boxes(h, w, features.device)).repeat(groups, 1).to(memory.dtype)
        else:
            q1 = self.num_queries_one2one
            n = q1 + (self.num_queries_one2many if many else 0)
            query_pos = self.query_embed.weight[:n, None].repeat(1, B, 1)
            tgt = self.query_feat.weight[:n, None].repeat(1, B, 1)
            reference = None
        mask = self.self_attn_mask(tgt.shape[0], features.device, q1)
        preds = []
        for sa, ca, ffn in zip(self.self_attn_layers, self.cross_attn_layers, self.ffn_layers):
            tgt = sa(tgt, tgt_mask=mask, query_pos=query_pos)
            tgt = ca(tgt, memory, pos=pos, query_pos=query_pos)
            tgt = ffn(tgt)
            hs = self.norm(tgt).transpose(0, 1)  # [B, n, C]
            delta = self.bbox_embed(hs)
            preds.append((self.class_embed(hs), (delta if reference is None else delta + reference).sigmoid()))
        out = {"pred_logits": preds[-1][0][:, :q1], "pred_boxes": preds[-1][1][:, :q1],
               "aux_outputs": [{"pred_logits": c[:, :q1], "pred_boxes": b[:, :q1]} for c, b in preds[:-1]]}
        if tgt.shape[0] > q1:
            out.update({"pred_logits_one2many": preds[-1][0][:, q1:], "pred_boxes_one2many": preds[-1][1][:, q1:],
                        "aux_outputs_one2many": [{"pred_logits": c[:, q1:], "pred_boxes": b[:, q1:]}
                                                 for c, b in preds[:-1]]})
        return out


@torch.no_grad()
def post_process(outputs: dict, image_size: tuple[int, int]) -> list[dict]:
    """DETR's ``PostProcess``: per query the best real class and its probability; boxes to xyxy pixels."""
    prob = outputs["pred_logits"].softmax(-1)[..., :-1]
    scores, labels = prob.max(-1)
    h, w = image_size
    boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"]) * torch.tensor([w, h, w, h], device=prob.device)
    return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


def window_features(backbone: nn.Module, x: Tensor, layers, n_windows_sqrt: int) -> Tensor:
    """The official detector's features: ``get_intermediate_layers(x, n=layers, reshape=True)`` concatenated
    ([B, 4D, H/16, W/16]) for each of the n×n windows (stitched back) and for the whole image resized to one
    window's size (then resized up), stacked on channels: ``[B, 2·4D, H/16, W/16]`` (``windows.py``)."""
    p = backbone.patch_size
    feats = lambda img: torch.cat(backbone.get_intermediate_layers(img, n=layers, reshape=True), 1)  # noqa: E731
    H, W = x.shape[-2:]
    wh = math.ceil((H // n_windows_sqrt) / p) * p
    ww = math.ceil((W // n_windows_sqrt) / p) * p
    hs = [wh] * (n_windows_sqrt - 1) + [H - wh * (n_windows_sqrt - 1)]
    ws = [ww] * (n_windows_sqrt - 1) + [W - ww * (n_windows_sqrt - 1)]
    y0s, x0s = np.cumsum([0] + hs), np.cumsum([0] + ws)
    rows = [torch.cat([feats(x[..., y0s[i]:y0s[i] + hs[i], x0s[j]:x0s[j] + ws[j]]) for j in range(n_windows_sqrt)], -1)
            for i in range(n_windows_sqrt)]
    windows = torch.cat(rows, -2)
    glob = feats(F.interpolate(x, size=(wh, ww), mode="bilinear", antialias=True, align_corners=False))
    glob = F.interpolate(glob, size=windows.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([glob, windows], 1)


@torch.no_grad()
def batched_window_features(backbone: nn.Module, images: Tensor, layers, n_windows_sqrt: int = 2,
                            batch_size: int = 64, device=None) -> Tensor:
    """:func:`window_features` of ``images`` ([N, 3, H, W] in [0, 1], ImageNet-normalised here), ``batch_size`` at a
    time on ``device`` (default: the backbone's), returned on the CPU."""
    device = next(backbone.parameters()).device if device is None else device
    x = normalize(images)
    return torch.cat([window_features(backbone, x[i:i + batch_size].to(device), layers, n_windows_sqrt).cpu()
                      for i in range(0, len(x), batch_size)])


def scene_targets(scenes: dict, normalized: bool = True) -> list[dict]:
    """ShapesWorld's ``boxes`` ([N, M, 4] pixel xyxy) and ``box_labels`` ([N, M], 0 = padding) → one target per
    image: ``labels`` 0..4 (shape class − 1) and ``boxes``, as cxcywh normalised by the image size (``normalized``,
    what the detector and its loss use) or as pixel xyxy (what :func:`average_precision` compares with)."""
    size = scenes["image"].shape[-1] if "image" in scenes else None
    if normalized and size is None:
        raise ValueError("normalised targets need the scenes' 'image' (its size is the unit of the boxes)")
    out = []
    for boxes, labels in zip(scenes["boxes"], scenes["box_labels"]):
        keep = labels > 0
        b = box_xyxy_to_cxcywh(boxes[keep] / size) if normalized else boxes[keep]
        out.append({"labels": labels[keep] - 1, "boxes": b})
    return out


# --------------------------------------------------------------------------------------------------- AP


def average_precision(predictions: list[dict], targets: list[dict], num_classes: int | None = None,
                      iou_thresholds=None, max_dets: int = 100) -> dict:
    """COCO bbox AP. ``predictions``: per image ``{"boxes": [N, 4] xyxy, "scores": [N], "labels": [N]}``;
    ``targets``: per image ``{"boxes": [T, 4] xyxy, "labels": [T]}``. Returns ``{"ap": AP@[.5:.95],
    "ap50": AP@0.5, "ap75", "per_class": {c: AP@[.5:.95]}}`` (mean over classes with ground truth).

    As ``COCOeval``: per image the ``max_dets`` best detections, greedily matched in score order, each to the
    unmatched ground truth of its class with the highest IoU ≥ t; detections of all images sorted by score
    (stable); precision made monotone; read at 101 recall points 0, 0.01, .., 1 (0 past the last recall)."""
    thresholds = np.linspace(0.5, 0.95, 10) if iou_thresholds is None else np.asarray(iou_thresholds, dtype=float)
    recall_points = np.linspace(0.0, 1.0, 101)
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()} if num_classes is None
                     else set(range(num_classes)))
    ap = {}
    for c in classes:
        scores_all, tp_all, n_gt = [], [], 0
        for pred, tgt in zip(predictions, targets):
            g = tgt["boxes"][tgt["labels"] == c].double()
            keep = pred["labels"] == c
            d, s = pred["boxes"][keep].double(), pred["scores"][keep].double()
            order = torch.sort(-s, stable=True).indices[:max_dets]
            d, s = d[order], s[order]
            n_gt += len(g)
            ious = box_iou(d, g)[0].numpy() if len(d) and len(g) else np.zeros((len(d), len(g)))
            tp = np.zeros((len(thresholds), len(d)), dtype=bool)
            for ti, t in enumerate(thresholds):
                taken = np.zeros(len(g), dtype=bool)
                for di in range(len(d)):
                    best, m = min(t, 1 - 1e-10), -1
                    for gi in range(len(g)):
                        if taken[gi] or ious[di, gi] < best:
                            continue
                        best, m = ious[di, gi], gi
                    if m >= 0:
                        taken[m] = True
                        tp[ti, di] = True
            scores_all.append(s.numpy())
            tp_all.append(tp)
        if n_gt == 0:
            continue  # COCO: a class without ground truth does not count
        scores = np.concatenate(scores_all)
        order = np.argsort(-scores, kind="mergesort")
        tp = np.concatenate(tp_all, 1)[:, order]
        per_t = []
        for row in tp:
            tps, fps = np.cumsum(row), np.cumsum(~row)
            recall = tps / n_gt
            precision = tps / (tps + fps + np.spacing(1))
            precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
            idx = np.searchsorted(recall, recall_points, side="left")
            q = np.array([precision[i] if i < len(precision) else 0.0 for i in idx])
            per_t.append(q.mean())
        ap[c] = np.array(per_t)
    if not ap:
        return {"ap": float("nan"), "ap50": float("nan"), "ap75": float("nan"), "per_class": {}}
    mean_t = np.mean(list(ap.values()), 0)  # per threshold, mean over classes

    def at(v: float) -> float:
        hit = np.isclose(thresholds, v)
        return float(mean_t[hit][0]) if hit.any() else float("nan")

    return {"ap": float(mean_t.mean()), "ap50": at(0.5), "ap75": at(0.75),
            "per_class": {c: float(v.mean()) for c, v in ap.items()}}
