"""``python -m dinolab.finetune segmentation``: six-class semantic segmentation of ShapesWorld scenes (notebook 10).

Heads: ``linear``, the official linear head (:class:`dinolab.seg_heads.LinearHead`: BatchNorm + 1×1 conv) on the
patch maps of blocks ``layers`` (cached), logits upsampled to the mask; ``fpn``, the pipeline backbone → adapter
(:class:`dinolab.adapter.DINOv3Adapter`) → pixel decoder (:class:`dinolab.pixel_decoder.MSDeformAttnPixelDecoder`)
→ FPN head (:class:`dinolab.seg_heads.FPNSegHead`), notebook 10's small widths, the backbone frozen. Scenes are
rendered at ``zoom`` × the size and cropped to the window around the floor (notebook 10: zoom 2, 128 px). Loss:
cross-entropy, weighted by class (``class_weighted``); metric: held-out mIoU (all six classes), per-class IoU,
pixel accuracy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import DINOv3Adapter
from .data import NUM_CLASSES, ShapesWorld
from .finetune import BackboneHead, class_weights
from .metrics import accuracy, miou
from .pixel_decoder import MSDeformAttnPixelDecoder
from .seg_heads import FPNSegHead, LinearHead
from .utils import normalize

HEADS = ("linear", "fpn")
PD_DIM, PD_HEADS, FPN_DIM = 64, 4, 64  # pixel decoder width and deformable heads, FPN width (notebook 10)


def recipe(head: str) -> dict:
    common = dict(n_train=384, n_val=128, image_size=128, zoom=2, layers=(1, 2, 4, 5), class_weighted=True)
    if head == "fpn":
        return {**common, "steps": 64, "batch_size": 16, "lr": 3e-3, "weight_decay": 1e-4, "warmup_steps": 10,
                "eval_every": 16}
    return {**common, "steps": 200, "batch_size": 32, "lr": 1e-2, "weight_decay": 1e-3, "warmup_steps": 15,
            "eval_every": 50}


def scenes(split: str, n: int, size: int, zoom: int, **kw) -> dict:
    """n scenes rendered at zoom × size, cropped to the size × size window around the floor (rows 112-239,
    columns 64-191 of a 256-px render for zoom 2, size 128); zoom 1 = the whole scene."""
    b = ShapesWorld(split, size=zoom * size, num_samples=n, **kw).tensors()
    top, left = size * (zoom - 1) * 7 // 8, size * (zoom - 1) // 2
    rows, cols = slice(top, top + size), slice(left, left + size)
    return {k: b[k][..., rows, cols].contiguous() for k in ("image", "mask", "depth")}


def data(cfg) -> dict:
    out = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        s = scenes(split, n, cfg.image_size, cfg.zoom)
        out[split] = {"x": normalize(s["image"]), "mask": s["mask"]}
    out["weights"] = class_weights(out["train"]["mask"], NUM_CLASSES) if cfg.class_weighted else None
    return out


class LinearSeg(BackboneHead):
    def head_forward(self, maps):
        return self.head(list(maps))  # logits at the patch grid


class PipelineSeg(BackboneHead):
    """adapter -> pixel decoder -> FPN head on [mask_features, ms[2], ms[1], ms[0]] (strides 4, 8, 16, 32)."""

    def __init__(self, backbone: nn.Module, layers):
        adapter = DINOv3Adapter(backbone, interaction_indexes=list(layers), conv_inplane=16, deform_num_heads=6,
                                drop_path_rate=0.0, with_cp=False, use_extra_extractor=False)
        head = nn.ModuleDict({
            "adapter": adapter,
            "pixel_decoder": MSDeformAttnPixelDecoder(backbone.embed_dim, conv_dim=PD_DIM, mask_dim=PD_DIM,
                                                      num_heads=PD_HEADS, dim_feedforward=2 * PD_DIM, num_layers=1,
                                                      num_points=4),
            "fpn": FPNSegHead(PD_DIM, FPN_DIM, NUM_CLASSES)})
        super().__init__(backbone, head, feature_kw=None)

    def head_forward(self, x):
        mask_features, multi_scale = self.head["pixel_decoder"](self.head["adapter"](x))
        return self.head["fpn"]([mask_features, *multi_scale[::-1]], output_size=x.shape[-2:])


def build(cfg, backbone: nn.Module) -> BackboneHead:
    if cfg.head == "fpn":
        return PipelineSeg(backbone, cfg.layers)
    head = LinearHead([backbone.embed_dim] * len(cfg.layers), NUM_CLASSES)
    return LinearSeg(backbone, head, dict(layers=list(cfg.layers), reshape=True, return_class_token=False))


def _logits(model, inputs, size):
    logits = model.head_forward(inputs)
    return logits if logits.shape[-2:] == size else F.interpolate(logits, size=size, mode="bilinear",
                                                                  align_corners=False)


def loss(model, inputs, batch: dict, data: dict, cfg, step: int) -> torch.Tensor:
    w = data["weights"]
    return F.cross_entropy(_logits(model, inputs, batch["mask"].shape[-2:]), batch["mask"],
                           weight=None if w is None else w.to(batch["mask"].device))


def predict(model, inputs, cfg) -> torch.Tensor:
    return _logits(model, inputs, (cfg.image_size, cfg.image_size)).argmax(1)


def score(pred: torch.Tensor, data: dict, cfg) -> dict:
    target = data["val"]["mask"]
    m, iou = miou(pred, target, NUM_CLASSES, per_class=True)
    iou = [None if v != v else round(v, 4) for v in iou.tolist()]  # NaN: a class absent from target and prediction
    return {"miou": m, "iou": iou, "pixel_acc": accuracy(pred, target)}
