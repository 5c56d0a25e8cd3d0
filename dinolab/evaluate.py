"""How good are frozen features? k-NN and linear probes on ShapesWorld, as DINOv3 evaluates its backbones.

* Image level, on the **object-centric split** (one object per image, ``object_scale=OBJECT_SCALE``, label = its
  class), as ImageNet is object-centric: k-NN on the normed CLS token as the official ``dinov3/eval/knn.py``
  (cosine similarity, the k nearest vote with weight exp(sim / T), T = 0.07, k in {10, 20}) and a linear
  probe (``dinov3/eval/linear.py`` trains a linear layer on frozen features; here on CLS ‖ mean patch).
* Dense, on the standard cluttered scenes: a linear probe per patch token against the mask (mIoU at the
  16-px patch grid, the label of a patch being its most frequent pixel class).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import NUM_CLASSES, ShapesWorld
from .linear import knn_predict
from .metrics import miou
from .train import extract_features

OBJECT_SCALE = 3.0  # object size multiplier of the object-centric split
KNN_KS = (10, 20)
KNN_T = 0.07


def object_split(split: str, n: int, size: int = 128, seed: int = 0) -> dict[str, Tensor]:
    """The first ``n`` images and labels of the object-centric split (one object, ``OBJECT_SCALE``)."""
    ds = ShapesWorld(split, size=size, n_objects=(1, 1), object_scale=OBJECT_SCALE, num_samples=max(n, 1), seed=seed)
    return ds.tensors(n)


def cls_features(backbone: nn.Module, images: Tensor, batch_size: int = 128) -> tuple[Tensor, Tensor]:
    """(normed CLS (N, D), mean of the normed patch tokens (N, D)) of a frozen backbone."""
    patches, cls = extract_features(backbone, images, layers=1, batch_size=batch_size, normalize=True)[0]
    return cls, patches.flatten(2).mean(-1)


def knn_accuracies(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                   ks=KNN_KS, T: float = KNN_T) -> dict[int, float]:
    """{k: accuracy} of the weighted k-NN (``heads.knn_predict``) for every k in ``ks``."""
    return {k: (knn_predict(train_feats, train_labels, val_feats, k=k, T=T, num_classes=NUM_CLASSES) == val_labels)
            .float().mean().item() for k in ks}


def linear_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int = NUM_CLASSES,
                 epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Accuracy of a linear classifier trained full-batch with AdamW on standardised frozen features."""
    g = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xt, xv = (train_x - mean) / std, (val_x - mean) / std
    lin = nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(xt), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (lin(xv).argmax(1) == val_y).float().mean().item()


def object_protocol(backbone: nn.Module, split: "ObjectKNN") -> dict[str, float]:
    """The image-level protocols on the object-centric split: k-NN (k = 10, 20) on the normed CLS token and the
    linear probe on [CLS ‖ mean patch] (``dinov3/eval/linear.py``'s input)."""
    (c_tr, m_tr), (c_va, m_va) = cls_features(backbone, split.x_train), cls_features(backbone, split.x_val)
    accs = knn_accuracies(c_tr, split.y_train, c_va, split.y_val)
    lin = linear_probe(torch.cat([c_tr, m_tr], 1), split.y_train, torch.cat([c_va, m_va], 1), split.y_val)
    return {**{f"k-NN k={k}": v for k, v in accs.items()}, "linear probe": lin}


def patch_labels(mask: Tensor, patch: int = 16) -> Tensor:
    """(N, S, S) pixel classes -> (N, S/p, S/p): the most frequent class in each patch."""
    one_hot = F.one_hot(mask, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return F.avg_pool2d(one_hot, patch).argmax(1)


def map_probe_miou(train_maps: Tensor, train_mask: Tensor, val_maps: Tensor, val_mask: Tensor, epochs: int = 150,
                   lr: float = 1e-2) -> float:
    """mIoU (all 6 classes, at the maps' grid) of a linear probe on frozen feature maps.

    ``*_maps`` (N, C, h, w); ``*_mask`` (N, S, S) pixel classes with S a multiple of h = w: a cell's label is its
    most frequent pixel class (:func:`patch_labels`). The probe is one linear layer on the standardised features
    of every cell, trained full-batch with AdamW and class-balanced cross-entropy."""
    if train_maps.ndim != 4 or val_maps.ndim != 4 or train_maps.shape[1] != val_maps.shape[1]:
        raise ValueError(f"feature maps must be (N, C, h, w) with the same C; got {tuple(train_maps.shape)} and "
                         f"{tuple(val_maps.shape)}")
    cells = []
    for maps, mask in ((train_maps, train_mask), (val_maps, val_mask)):
        h, w, S = maps.shape[-2], maps.shape[-1], mask.shape[-1]
        if h != w or S % h or mask.shape[-2] != S or mask.shape[0] != maps.shape[0]:
            raise ValueError(f"maps {tuple(maps.shape)} do not tile masks {tuple(mask.shape)}: need square maps whose "
                             "size divides the mask's, one mask per map")
        cells.append((maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).float(),
                      patch_labels(mask, S // h).flatten()))
    (xt, yt), (xv, yv) = cells
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xv = (xt - mean) / std, (xv - mean) / std
    # class-balanced weights, or the probe predicts background everywhere
    w = 1.0 / torch.bincount(yt, minlength=NUM_CLASSES).float().clamp_min(1)
    w = w / w.sum() * NUM_CLASSES
    torch.manual_seed(0)
    lin = nn.Linear(xt.shape[1], NUM_CLASSES)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(lin(xt), yt, weight=w).backward()
        opt.step()
    with torch.no_grad():
        pred = lin(xv).argmax(1)
    return miou(pred, yv, NUM_CLASSES)


def patch_probe_miou(backbone: nn.Module, train: dict, val: dict, epochs: int = 150, lr: float = 1e-2) -> float:
    """mIoU (all 6 classes, patch grid) of a linear probe on the frozen normed patch tokens (:func:`map_probe_miou`)."""
    def tokens(images):
        return extract_features(backbone, images, layers=1, batch_size=128, normalize=True,
                                return_class_token=False)[0]

    return map_probe_miou(tokens(train["image"]), train["mask"], tokens(val["image"]), val["mask"], epochs, lr)


class ObjectKNN:
    """A callable for ``dinolab.pretrain.train(evaluate=...)``: k-NN (k = 10, 20) of the CLS token on the
    object-centric split, ``n_train`` / ``n_val`` images rendered once."""

    def __init__(self, n_train: int = 2048, n_val: int = 1024, size: int = 128):
        tr, va = object_split("train", n_train, size), object_split("val", n_val, size)
        self.x_train, self.y_train, self.x_val, self.y_val = tr["image"], tr["label"], va["image"], va["label"]

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        ft, fv = cls_features(backbone, self.x_train)[0], cls_features(backbone, self.x_val)[0]
        return {f"knn{k}": round(v, 4) for k, v in knn_accuracies(ft, self.y_train, fv, self.y_val).items()}
