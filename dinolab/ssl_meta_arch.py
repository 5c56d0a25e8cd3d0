"""What one pretraining step computes, besides the losses: the student (backbone + DINO and iBOT heads), the
prototypes kept on the unit sphere, the teacher's targets over all processes, and the Gram teacher's targets.

Official: ``dinov3/train/ssl_meta_arch.py``. The loop that uses them is ``dinolab.pretrain.train``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import augment, hub, losses
from .dino_head import DINOHead
from .utils import normalize

if TYPE_CHECKING:
    from .pretrain import PretrainConfig

__all__ = ["Student", "normalize_prototypes"]


class Student(nn.Module):
    """Backbone + DINO head + iBOT head, one forward for DDP."""

    def __init__(self, cfg: PretrainConfig):
        super().__init__()
        self.backbone = hub.build(cfg.arch, drop_path_rate=cfg.drop_path_rate, layerscale_init=cfg.layerscale_init)
        D = self.backbone.embed_dim
        head = dict(out_dim=cfg.head_out_dim, hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim)
        self.dino_head = DINOHead(D, **head)
        self.ibot_head = DINOHead(D, **head)

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor | None,
                mask_inputs: bool = True):
        """``masks`` (2B, N) selects the patches of the iBOT loss; ``mask_inputs``: also replace them by
        the mask token in the input (the student); the teacher sees the whole crop (False)."""
        crops = [global_crops] + ([local_crops] if local_crops is not None else [])
        in_masks = masks if mask_inputs else None
        outs = self.backbone.forward_features(crops, masks=[in_masks] + [None] * (len(crops) - 1))
        g = outs[0]
        cls = [g["x_norm_clstoken"]] + [o["x_norm_clstoken"] for o in outs[1:]]
        n_global = g["x_norm_clstoken"].shape[0]
        logits = self.dino_head(torch.cat(cls))
        patch_logits = self.ibot_head(g["x_norm_patchtokens"][masks]) if masks is not None else None
        return {"cls": g["x_norm_clstoken"], "patches": g["x_norm_patchtokens"],
                "global_logits": logits[:n_global], "local_logits": logits[n_global:], "patch_logits": patch_logits}


@torch.no_grad()
def normalize_prototypes(student: "Student") -> None:
    """Rows of both heads' last layers back onto the unit sphere (see PretrainConfig.norm_last_layer)."""
    for head in (student.dino_head, student.ibot_head):
        w = head.last_layer.weight
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sinkhorn_global(logits: Tensor, temp: float) -> Tensor:
    """Sinkhorn-Knopp over the whole (all-gathered) batch; returns this rank's rows."""
    rank, world = _world()
    if world == 1:
        return losses.sinkhorn_knopp(logits, temp)
    parts = [torch.empty_like(logits) for _ in range(world)]
    dist.all_gather(parts, logits.contiguous())
    return losses.sinkhorn_knopp(torch.cat(parts), temp).chunk(world)[rank]


def _update_center_global(center: Tensor, logits: Tensor, momentum: float) -> Tensor:
    """``losses.update_center`` with the batch mean taken over every process."""
    _, world = _world()
    if world == 1:
        return losses.update_center(center, logits, momentum)
    mean = logits.detach().float().reshape(-1, logits.shape[-1]).mean(dim=0, keepdim=True)
    dist.all_reduce(mean)  # the sum of the ranks' means; equal batches per rank, so / world is the global mean
    return losses.update_center(center, mean / world, momentum)


def _gram_teacher_targets(gram_teacher: nn.Module, images: Tensor, boxes: Tensor, flips: Tensor,
                          size: int, grid: int) -> Tensor:
    """Patch features of the Gram teacher on clean (undistorted) crops at 2x the student resolution,
    resized bicubically to the student's grid: (n_crops * B, grid * grid, D)."""
    crops = torch.cat([augment.crop_and_resize(images, boxes[c], 2 * size, flip=flips[c]) for c in range(boxes.shape[0])])
    crops = normalize(crops)
    feats = gram_teacher.forward_features(crops)["x_norm_patchtokens"]  # (nB, (2g)^2, D)
    n, _, D = feats.shape
    fmap = feats.transpose(1, 2).reshape(n, D, 2 * grid, 2 * grid)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bicubic", align_corners=False)
    return fmap.flatten(2).transpose(1, 2)
