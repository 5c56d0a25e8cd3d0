"""``python -m dinolab.finetune classification``: the linear probe on the object-centric split (notebook 12).

One object per image (``ShapesWorld(n_objects=(1, 1), object_scale=3)``, :func:`dinolab.evaluate.object_split`),
label = its shape. Head: :class:`dinolab.linear.LinearClassifier` on the cached last block's [CLS ‖ mean patch]
(``linear``, official) or CLS alone (``cls``), trained as the official linear eval: SGD with momentum, cosine
schedule, cross-entropy. Classes with no training image (background) are never predicted. Metric: accuracy on the
val split, next to the majority-class baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_CLASSES
from .evaluate import object_split
from .finetune import BackboneHead
from .linear import LinearClassifier
from .utils import normalize

HEADS = ("linear", "cls")


def recipe(head: str) -> dict:
    # notebook 12: 30 epochs of 1,024 images at batch 128, SGD (momentum 0.9, no weight decay), cosine
    return dict(n_train=1024, n_val=512, image_size=128, batch_size=128, steps=240, optimizer="sgd", lr=0.03,
                momentum=0.9, weight_decay=0.0, warmup_steps=0, layers=(5,), eval_every=60)


def data(cfg) -> dict:
    out = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        b = object_split(split, n, size=cfg.image_size)
        out[split] = {"x": normalize(b["image"]), "label": b["label"]}
    out["counts"] = torch.bincount(out["train"]["label"], minlength=NUM_CLASSES)
    return out


class Classifier(BackboneHead):
    def head_forward(self, pairs):
        return self.head(list(pairs))


def build(cfg, backbone: nn.Module) -> BackboneHead:
    head = LinearClassifier(backbone.embed_dim, NUM_CLASSES, use_cls=True, use_mean_patch=cfg.head == "linear")
    return Classifier(backbone, head, dict(layers=list(cfg.layers), reshape=False, return_class_token=True))


def loss(model, inputs, batch: dict, data: dict, cfg, step: int) -> torch.Tensor:
    return F.cross_entropy(model.head_forward(inputs), batch["label"])


def predict(model, inputs, cfg) -> torch.Tensor:
    return model.head_forward(inputs)  # logits; score() masks the absent classes


def score(logits: torch.Tensor, data: dict, cfg) -> dict:
    counts, y = data["counts"], data["val"]["label"]
    pred = logits.masked_fill(counts == 0, float("-inf")).argmax(1)
    return {"acc": float((pred == y).float().mean()), "majority_acc": float((y == counts.argmax()).float().mean())}
