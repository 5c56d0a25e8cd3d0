"""Deformable DETR's transformer encoder (encoder only), as the Mask2Former pixel decoder uses it.

Official: ``dinov3/eval/segmentation/models/heads/pixel_decoder.py`` (from Mask2Former's ``msdeformattn.py``).
Every token of the flattened levels is a query whose reference point is its own pixel centre on every level;
each post-norm layer is deformable self-attention (:class:`dinolab.msdeform.MSDeformAttn`) and a ReLU FFN.
:class:`MSDeformAttnTransformerEncoderOnly` flattens the levels and adds the position and level encodings;
:class:`dinolab.pixel_decoder.MSDeformAttnPixelDecoder` builds one as ``self.encoder``. Parameter names are the
official ones (``encoder.level_encoding``, ``encoder.encoder.layers.{i}.self_attn.*``, ...).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msdeform import MSDeformAttn

__all__ = ["MSDeformAttnTransformerEncoderLayer", "MSDeformAttnTransformerEncoder", "MSDeformAttnTransformerEncoderOnly"]


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}  # official _get_activation_fn


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then a ReLU FFN.

    ``src = norm1(src + dropout1(self_attn(src + pos, ref, src)))``;
    ``src = norm2(src + dropout3(linear2(dropout2(relu(linear1(src))))))``.
    The position embedding is added to the *query* only (it steers where to sample); values are the raw tokens.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation should be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        # self attention
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # ffn
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _ACTIVATIONS[activation]
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor: Tensor, pos: Tensor | None) -> Tensor:
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, src: Tensor) -> Tensor:
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))

    def forward(self, src: Tensor, pos: Tensor | None, reference_points: Tensor, spatial_shapes,
                level_start_index: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        src2 = self.self_attn(self.with_pos_embed(src, pos), reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        return self.forward_ffn(src)


class MSDeformAttnTransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer`` (official ``_get_clones``)."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios: Tensor, device, dtype=torch.float32) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1] as (x, y): [B, ΣHW, L, 2].

        Token (y, x) of level l gets ``((x + 0.5) / W_l, (y + 0.5) / H_l)``, the same relative position on every
        level (``valid_ratios`` rescale it when there is padding; without padding they are all 1).
        """
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            h, w = int(h), int(w)
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=dtype, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=dtype, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(refs, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, spatial_shapes, level_start_index: Tensor, valid_ratios: Tensor,
                pos: Tensor | None = None, padding_mask: Tensor | None = None) -> Tensor:
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, src.device, src.dtype)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Flattens the levels, adds ``pos + level_encoding[l]``, runs the encoder.

    ``forward(srcs, pos_embeds)`` with lists of [B, d_model, H_l, W_l] → (memory [B, ΣHW, d_model],
    spatial_shapes (list of (H, W)), level_start_index LongTensor [L]).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, activation: str = "relu", num_feature_levels: int = 4,
                 enc_n_points: int = 4):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        encoder_layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = MSDeformAttnTransformerEncoder(encoder_layer, num_encoder_layers)
        self.level_encoding = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # official: xavier on every matrix, then MSDeformAttn's own init, level encoding N(0, 1)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_encoding)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """[B, H, W] padding mask → [B, 2] (valid width fraction, valid height fraction)."""
        _, H, W = mask.shape
        valid_H = torch.sum(~mask[:, :, 0], 1)
        valid_W = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]):
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, h, w = src.shape
            spatial_shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_embed = pos_embed.flatten(2).transpose(1, 2).to(src.dtype)
            lvl_pos_embed_flatten.append(pos_embed + self.level_encoding[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        starts = [0]
        for h, w in spatial_shapes[:-1]:
            starts.append(starts[-1] + h * w)
        level_start_index = torch.tensor(starts, dtype=torch.long, device=src_flatten.device)
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1).to(src_flatten.dtype)
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten)
        return memory, spatial_shapes, level_start_index
