"""Segmentation heads on top of the (frozen) backbone or the adapter.

* ``FPNSegHead``: the FPN decoder head of the group-meeting blog post this series starts from (a top-down
  feature pyramid over the adapter's four levels; the author's own design, not an official DINOv3 head);
* ``LinearHead``: the official DINOv3 linear head (``dinov3/eval/segmentation/models/heads/linear_head.py``),
  with the official parameter names, so its checkpoints load with ``strict=True``. The official depth
  evaluation's linear head has the same layout (:mod:`dinolab.depth_head` uses this class).

The Mask2Former pixel decoder is in :mod:`dinolab.pixel_decoder`. The official uses ``SyncBatchNorm``; we use
``BatchNorm2d`` (same state dict, runs on a CPU).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvBNReLU", "FPNSegHead", "LinearHead"]


# =================================================================================================================
# The FPN head of the group-meeting blog post this series starts from (not an official DINOv3 head)
# =================================================================================================================


class ConvBNReLU(nn.Sequential):
    """3×3 (by default) conv without bias → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _as_level_list(features) -> list[Tensor]:
    """The adapter's dict {"1": f1, ..., "4": f4} (in its order, finest first) or a list/tuple of maps."""
    if isinstance(features, Tensor):
        return [features]
    if isinstance(features, Mapping):
        return list(features.values())
    if isinstance(features, (list, tuple)):
        return list(features)
    raise TypeError(f"expected a dict or a list of [B, C, H, W] maps, got {type(features).__name__}")


class FPNSegHead(nn.Module):
    """The FPN decoder head of the group-meeting blog post this series starts from (not an official DINOv3
    head): a top-down pathway over the four adapter levels (finest first).

    ``p4 = lateral(f4)``; for each finer level ``p_l = smooth_l(lateral_l(f_l) + up(p_{l+1}))`` (bilinear up,
    ConvBNReLU 3×3 smoothing); ``logits = cls_seg(p1)`` at the finest level (stride 4), then bilinearly
    upsampled to ``output_size`` (default: ``upsample_factor`` × the finest level, i.e. the input size).

    Cheap and local: every output pixel sees a fixed neighbourhood per level, unlike the deformable encoder of
    the pixel decoder, whose tokens choose where to look.

    Args:
        in_channels: per-level channels, finest first (an int means the same for all ``num_levels``).
        channels: width of the top-down pathway.
        num_classes: output channels.
        num_levels: number of levels when ``in_channels`` is an int (4).
        upsample_factor: stride of the finest level (4), for the default output size.
    """

    def __init__(self, in_channels, channels: int, num_classes: int, num_levels: int = 4, upsample_factor: int = 4):
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = [in_channels] * num_levels
        elif isinstance(in_channels, Mapping):
            in_channels = list(in_channels.values())
        self.in_channels = [int(c) for c in in_channels]
        if len(self.in_channels) < 1:
            raise ValueError("FPNSegHead needs at least one level")
        self.channels = channels
        self.num_classes = num_classes
        self.upsample_factor = upsample_factor
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in self.in_channels)
        # one smoothing block per level that receives an upsampled coarser map (all but the coarsest)
        self.smooth_convs = nn.ModuleList(ConvBNReLU(channels, channels) for _ in self.in_channels[:-1])
        self.cls_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward_features(self, features) -> Tensor:
        """Top-down fused map at the finest level: [B, channels, H/4, W/4]."""
        feats = _as_level_list(features)
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} levels (finest first), got {len(feats)}")
        for i, (f, c) in enumerate(zip(feats, self.in_channels)):
            if f.dim() != 4 or f.shape[1] != c:
                raise ValueError(f"level {i} must be [B, {c}, H, W], got {tuple(f.shape)}")
        p = self.lateral_convs[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):  # coarse → fine
            lat = self.lateral_convs[i](feats[i])
            p = lat + F.interpolate(p, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            p = self.smooth_convs[i](p)
        return p

    def forward(self, features, output_size: tuple[int, int] | None = None) -> Tensor:
        """Logits [B, num_classes, *output_size] (default: upsample_factor × the finest level)."""
        logits = self.cls_seg(self.forward_features(features))
        if output_size is None:
            output_size = (logits.shape[-2] * self.upsample_factor, logits.shape[-1] * self.upsample_factor)
        return F.interpolate(logits, size=tuple(output_size), mode="bilinear", align_corners=False)


# =================================================================================================================
# Segmentation: the official linear head (dinov3/eval/segmentation/models/heads/linear_head.py)
# =================================================================================================================


def _with_cls(inputs, use_cls_token: bool) -> list[Tensor]:
    """Official ``_forward_feature`` input handling: maps, or (map, cls) pairs when ``use_cls_token``.

    With the cls token, it is broadcast over the map and concatenated on channels. 2-d inputs [B, C] become
    [B, C, 1, 1] maps.
    """
    if isinstance(inputs, Tensor):
        inputs = [inputs]
    elif isinstance(inputs, Mapping):
        inputs = list(inputs.values())
    out = []
    for x in inputs:
        if use_cls_token:
            if not isinstance(x, (list, tuple)) or len(x) != 2:
                raise ValueError("use_cls_token=True: each input must be a (patch map, cls token) pair "
                                 "(get_intermediate_layers(..., reshape=True, return_class_token=True))")
            x, cls_token = x
            if x.dim() == 2:
                x = x[:, :, None, None]
            out.append(torch.cat((x, cls_token[:, :, None, None].expand_as(x)), 1))
        else:
            if isinstance(x, (list, tuple)):  # tolerate (map, cls) pairs and use the map only
                x = x[0]
            out.append(x[:, :, None, None] if x.dim() == 2 else x)
    return out


class LinearHead(nn.Module):
    """Official DINOv3 linear segmentation head.

    ``inputs`` (list of [B, D_i, h_i, w_i], e.g. ``get_intermediate_layers(x, n=..., reshape=True)``) are
    bilinearly resized to the first one's size and concatenated (channels = Σ D_i, ×2 with the cls token) →
    ``Dropout2d(dropout)`` → ``BatchNorm`` → ``Conv2d 1×1 → n_output_channels`` (weight N(0, 0.01), bias 0).
    Logits stay at the patch grid (1/16); training resizes them to the label size.

    Parameter names: ``batchnorm_layer.{weight,bias,running_mean,running_var,num_batches_tracked}``,
    ``conv.{weight,bias}``. The official uses ``nn.SyncBatchNorm``; ``nn.BatchNorm2d`` has the same state dict
    and runs on one CPU (convert with ``nn.SyncBatchNorm.convert_sync_batchnorm`` for multi-GPU training).
    """

    def __init__(self, in_channels, n_output_channels: int, use_batchnorm: bool = True, use_cls_token: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        if isinstance(in_channels, int):
            in_channels = [in_channels]
        self.in_channels = list(in_channels)
        self.channels = sum(self.in_channels) * (2 if use_cls_token else 1)
        self.n_output_channels = n_output_channels
        self.use_cls_token = use_cls_token
        self.batchnorm_layer = nn.BatchNorm2d(self.channels) if use_batchnorm else nn.Identity()
        self.conv = nn.Conv2d(self.channels, n_output_channels, kernel_size=1, padding=0, stride=1)
        self.dropout = nn.Dropout2d(dropout)
        nn.init.normal_(self.conv.weight, mean=0, std=0.01)
        nn.init.constant_(self.conv.bias, 0)

    def _transform_inputs(self, inputs: list[Tensor]) -> Tensor:
        size = inputs[0].shape[2:]
        return torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in inputs], dim=1)

    def _forward_feature(self, inputs) -> Tensor:
        x = self._transform_inputs(_with_cls(inputs, self.use_cls_token))
        if x.shape[1] != self.channels:
            raise ValueError(f"inputs have {x.shape[1]} channels in total, the head expects {self.channels} "
                             f"(in_channels={self.in_channels}, use_cls_token={self.use_cls_token})")
        return x

    def forward(self, inputs) -> Tensor:
        """Logits at the first input's resolution: [B, n_output_channels, h, w]."""
        return self.conv(self.batchnorm_layer(self.dropout(self._forward_feature(inputs))))

    def predict(self, x, rescale_to=(512, 512)) -> Tensor:
        """Evaluation: no dropout, logits bilinearly resized to ``rescale_to``."""
        x = self.conv(self.batchnorm_layer(self._forward_feature(x)))
        return F.interpolate(x, size=tuple(rescale_to), mode="bilinear", align_corners=False)
