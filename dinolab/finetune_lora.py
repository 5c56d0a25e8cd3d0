"""``python -m dinolab.finetune lora``: adapt the backbone to the shifted domain (notebook 13).

Task: foreground segmentation (background vs any shape) of ``ShapesWorld(domain="shifted")`` scenes, with the
official linear head (:class:`dinolab.seg_heads.LinearHead`, dropout 0) on the last block's patch map, logits
upsampled to the image. Heads: ``lora`` (:func:`dinolab.lora.apply_lora`, rank ``lora_rank``, alpha ``lora_alpha``,
on q and v; the LoRA tensors at ``backbone_lr``), ``full`` (every backbone parameter at ``backbone_lr``) and
``linear`` (the frozen probe, cached features: the baseline). The backbone runs in eval mode (as in the notebook).
Loss: cross-entropy, weighted by class (``class_weighted``); metric: foreground IoU on the shifted val split, and
the trainable parameter count. Saved: the LoRA tensors and the head (``full``: the whole backbone and the head).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import lora as lora_lib
from .data import ShapesWorld
from .finetune import BackboneHead, class_weights
from .metrics import miou
from .seg_heads import LinearHead
from .utils import normalize

HEADS = ("lora", "full", "linear")
NC = 2  # background, foreground


def recipe(head: str) -> dict:
    return dict(n_train=384, n_val=256, image_size=128, steps=60, batch_size=16, lr=1e-2, warmup_steps=5,
                weight_decay=1e-4, backbone_lr={"lora": 5e-3, "full": 2e-4, "linear": 0.0}[head], lora_rank=4,
                lora_alpha=8.0, layers=(5,), class_weighted=True, eval_every=20)


def data(cfg) -> dict:
    out = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        b = ShapesWorld(split, size=cfg.image_size, num_samples=n, domain="shifted").tensors()
        out[split] = {"x": normalize(b["image"]), "fg": (b["mask"] > 0).long()}
    out["weights"] = class_weights(out["train"]["fg"], NC) if cfg.class_weighted else None
    return out


class ShiftedSeg(BackboneHead):
    def __init__(self, backbone, head, feature_kw, layers, size: int):
        super().__init__(backbone, head, feature_kw)
        self.layers, self.size = list(layers), size

    def head_forward(self, x):
        maps = x if self.feature_kw is not None else self.backbone.get_intermediate_layers(x, n=self.layers,
                                                                                            reshape=True)
        return F.interpolate(self.head(list(maps)), size=(self.size, self.size), mode="bilinear", align_corners=False)


def build(cfg, backbone: nn.Module) -> BackboneHead:
    if cfg.head == "lora":
        lora_lib.apply_lora(backbone, r=cfg.lora_rank, alpha=cfg.lora_alpha, targets=("q", "v"))  # freezes the rest
    elif cfg.head == "full":
        backbone.requires_grad_(True)
    head = LinearHead([backbone.embed_dim] * len(cfg.layers), NC, dropout=0.0)
    kw = dict(layers=list(cfg.layers), reshape=True, return_class_token=False) if cfg.head == "linear" else None
    return ShiftedSeg(backbone, head, kw, cfg.layers, cfg.image_size)


def param_groups(model: ShiftedSeg, cfg) -> list[dict]:
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    bb = [p for p in model.backbone.parameters() if p.requires_grad]
    return groups + ([{"params": bb, "lr": cfg.backbone_lr}] if bb else [])


def loss(model, inputs, batch: dict, data: dict, cfg, step: int) -> torch.Tensor:
    w = data["weights"]
    return F.cross_entropy(model.head_forward(inputs), batch["fg"],
                           weight=None if w is None else w.to(batch["fg"].device))


def predict(model, inputs, cfg) -> torch.Tensor:
    return model.head_forward(inputs).argmax(1)


def score(pred: torch.Tensor, data: dict, cfg) -> dict:
    m, iou = miou(pred, data["val"]["fg"], NC, per_class=True)
    return {"fg_iou": float(iou[1]), "miou": m}
