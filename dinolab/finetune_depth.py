"""``python -m dinolab.finetune depth``: metric depth of ShapesWorld scenes (notebook 11).

Heads on the cached (patch map, cls) pairs of blocks ``layers``: ``dpt``, the official DPT head
(:class:`dinolab.depth_head.DPTHead`, notebook 11's small widths), and ``linear``, the official depth linear head
(:class:`dinolab.seg_heads.LinearHead`, BatchNorm + 1×1 conv to the bins at the patch grid, the depth map upsampled).
Both predict ``n_bins`` log-spaced bins (0.5-11 m) turned into depth by :class:`dinolab.depth_head.FeaturesToDepth`;
loss: :class:`dinolab.depth_head.SigLoss` (mean term only for the first ``WARM_ITER`` steps). Metrics on the val
split: AbsRel, δ1, RMSE, and for reference those of the per-row prior (the mean training depth of each image row,
which never looks at the image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import ShapesWorld
from .depth_head import DPTHead, FeaturesToDepth, LinearHead, SigLoss
from .finetune import BackboneHead
from .metrics import absrel, delta1, rmse
from .utils import normalize

HEADS = ("dpt", "linear")
MIN_DEPTH, MAX_DEPTH, WARM_ITER = 0.5, 11.0, 20  # notebook 11 (official warm_iter: 100)


def recipe(head: str) -> dict:
    common = dict(n_train=1024, n_val=256, image_size=128, layers=(2, 3, 4, 5), n_bins=32, weight_decay=1e-4,
                  warmup_steps=10, steps=200, eval_every=50)
    if head == "linear":
        return {**common, "batch_size": 16, "lr": 3e-2}
    return {**common, "batch_size": 8, "lr": 3e-3}


def data(cfg) -> dict:
    out = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        b = ShapesWorld(split, size=cfg.image_size, num_samples=n).tensors()
        out[split] = {"x": normalize(b["image"]), "depth": b["depth"]}
    out["row_prior"] = out["train"]["depth"].mean(dim=(0, 2))  # (S,): mean depth of each row
    return out


class DepthModel(BackboneHead):
    """head(features) -> bins -> depth [B, 1, S, S] in metres (the linear head's depth upsampled from the grid)."""

    def __init__(self, backbone, head, feature_kw, size: int):
        super().__init__(backbone, head, feature_kw)
        self.size = size
        self.to_depth = FeaturesToDepth(MIN_DEPTH, MAX_DEPTH, "log", "linear")

    def head_forward(self, feats):
        d = self.to_depth(self.head(list(feats)))
        if d.shape[-2:] != (self.size, self.size):
            d = F.interpolate(d, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return d


def build(cfg, backbone: nn.Module) -> BackboneHead:
    D, n = backbone.embed_dim, len(cfg.layers)
    if n != 4 and cfg.head == "dpt":
        raise ValueError(f"the DPT head reads exactly 4 layers, got layers={list(cfg.layers)}")
    if cfg.head == "linear":
        head = LinearHead([D] * n, cfg.n_bins, use_batchnorm=True, dropout=0.0)
    else:
        head = DPTHead(in_channels=(D,) * 4, channels=32, post_process_channels=[32, 32, 64, 64],
                       readout_type="project", n_output_channels=cfg.n_bins, use_batchnorm=True, n_hidden_channels=16)
    kw = dict(layers=list(cfg.layers), reshape=True, return_class_token=True)
    return DepthModel(backbone, head, kw, cfg.image_size)


def loss(model, inputs, batch: dict, data: dict, cfg, step: int) -> torch.Tensor:
    sig = SigLoss(warm_up=True, warm_iter=WARM_ITER)
    sig.warm_up_counter = min(step, WARM_ITER)  # the warm-up follows the step, so a resumed run matches
    return sig(model.head_forward(inputs), batch["depth"])


def predict(model, inputs, cfg) -> torch.Tensor:
    return model.head_forward(inputs)[:, 0]


def score(pred: torch.Tensor, data: dict, cfg) -> dict:
    gt = data["val"]["depth"]
    prior = data["row_prior"].view(1, -1, 1).expand_as(gt)
    return {"absrel": absrel(pred, gt), "delta1": delta1(pred, gt), "rmse": rmse(pred, gt),
            "row_prior_absrel": absrel(prior, gt), "row_prior_delta1": delta1(prior, gt)}
