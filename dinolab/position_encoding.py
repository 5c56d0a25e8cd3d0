"""DETR's fixed 2-d sine position embedding (Mask2Former's ``position_encoding.py``).

Used by the pixel decoder (:mod:`dinolab.pixel_decoder`), the Mask2Former query decoder (:mod:`dinolab.mask2former`)
and the tiny detector (:mod:`dinolab.detection`). No parameters.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-d sine position embedding (no parameters).

    For pixel (y, x) of an H×W map (1-based cumulative counts; with ``normalize`` scaled to (0, 2π]):
    ``pos = [sin/cos(y / T^(2⌊k/2⌋/F)) for k < F] ‖ [same for x]`` with F = ``num_pos_feats``, T = temperature,
    sines on even k and cosines on odd k. Output [B, 2F, H, W]: the first F channels encode y, the last F x.
    The pixel decoder uses F = conv_dim // 2 so the embedding has conv_dim channels.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: [B, C, H, W] (only its shape and device are used); mask: [B, H, W] bool, True = padding."""
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        # float32 like the official (also for half inputs); float64 inputs get a float64 embedding
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=dtype)  # 1..H down the rows
        x_embed = not_mask.cumsum(2, dtype=dtype)  # 1..W along the columns
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=dtype, device=x.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # interleave: channel 2j = sin(angle_j), channel 2j+1 = cos(angle_j)
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")
