"""Mask2Former's masked-attention query decoder and the head DINOv3 reports segmentation with.

Official: ``dinov3/eval/segmentation/models/heads/mask2former_transformer_decoder.py`` (the decoder, from
Mask2Former, Cheng et al. 2022) and ``mask2former_head.py`` (pixel decoder + decoder); semantic inference in
``dinov3/eval/segmentation/inference.py``.

``num_queries`` learned queries (content ``query_feat`` + position ``query_embed``) are refined by ``dec_layers``
layers. Layer i reads one level of the pixel decoder's ``multi_scale_features`` (1/32, 1/16, 1/8, round robin,
``i % 3``) with **masked cross-attention**, then does self-attention among the queries and an FFN (all post-norm
in DINOv3). Before every layer, and after the last, shared heads predict from the queries:

* ``class_embed``: logits over ``num_classes + 1`` (the last one is "no object");
* ``mask_embed`` (3-layer MLP) · ``mask_features`` → mask logits ``[B, Q, H/4, W/4]``.

Masked attention: in layer i a query may attend only to the pixels where its *previous* mask prediction, resized
(bilinear) to that layer's level, has sigmoid >= 0.5; a query whose mask is empty everywhere may attend to all.

Shapes (DINOv3's ViT-7B head: hidden 2048, 100 queries, 16 heads, FFN 4096, 9 layers, 150 ADE20k classes;
512² input): multi-scale features [B, 2048, 16², 32², 64²], mask_features [B, 2048, 128, 128] →
``pred_logits`` [B, 100, 151], ``pred_masks`` [B, 100, 128, 128], ``aux_outputs``: 9 dicts of the same
(the predictions before layer 1 .. before layer 9). Parameter names are the official ones (``nn.MultiheadAttention``
keeps its fused ``in_proj_weight``), so an official ``Mask2FormerHead`` state dict loads with ``strict=True``.

Difference from the official code, outside the state dict: the "unmask all-masked rows" step is written without
data-dependent indexing (``mask & ~mask.all(-1)``: the same result) so the module also runs on the meta device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import Conv2d, MSDeformAttnPixelDecoder
from .position_encoding import PositionEmbeddingSine

__all__ = ["DINOV3_DECODER_CONFIG", "SelfAttentionLayer", "CrossAttentionLayer", "FFNLayer", "MLP",
           "MultiScaleMaskedTransformerDecoder", "Mask2FormerHead", "semantic_inference"]

# The decoder inside DINOv3's Mask2FormerHead(hidden_dim=2048) (mask2former_head.py, hard-coded there).
DINOV3_DECODER_CONFIG = dict(hidden_dim=2048, num_queries=100, nheads=16, dim_feedforward=4096, dec_layers=9,
                             pre_norm=False, mask_dim=2048, enforce_input_project=False)


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other. Post-norm: ``norm(tgt + attn(tgt + pos, tgt + pos, tgt))``; pre-norm
    normalises first. Sequence-first tensors ``[Q, B, C]`` (``nn.MultiheadAttention``'s default)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():  # official _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, tgt_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        x = self.self_attn(q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Queries ``[Q, B, C]`` read the pixels ``memory [HW, B, C]``; ``memory_mask [B·heads, Q, HW]`` (bool, True =
    may NOT attend) is the masked attention. Keys get the pixels' sine position, queries their ``query_pos``."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.multihead_attn(query=_with_pos(x, query_pos), key=_with_pos(memory, pos), value=memory,
                                attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask)[0]
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """``linear2(relu(linear1(x)))`` with a residual and a LayerNorm (after, or before with ``normalize_before``)."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, normalize_before: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.normalize_before = normalize_before
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        tgt = tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x)))))
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linears with ReLU between them (DETR's box / mask-embedding head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Mask2Former's query decoder (official constructor and forward).

    ``forward(x, mask_features, mask=None)``: ``x`` = 3 maps ``[B, in_channels, h_l, w_l]`` (the pixel decoder's
    multi-scale features, coarse first), ``mask_features [B, mask_dim, H/4, W/4]``; ``mask`` is ignored, as in the
    official code. Returns ``{"pred_logits": [B, Q, C+1], "pred_masks": [B, Q, H/4, W/4], "aux_outputs": [...]}``
    with ``dec_layers`` aux entries (the predictions made before each layer).
    """

    def __init__(self, in_channels: int, mask_classification: bool = True, *, num_classes: int, hidden_dim: int,
                 num_queries: int, nheads: int, dim_feedforward: int, dec_layers: int, pre_norm: bool,
                 mask_dim: int, enforce_input_project: bool):
        super().__init__()
        if not mask_classification:
            raise ValueError("only mask classification is supported (as the official code)")
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads, 0.0, pre_norm) for _ in range(dec_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(hidden_dim, dim_feedforward, 0.0, pre_norm) for _ in range(dec_layers))
        self.post_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query position
        self.num_feature_levels = 3  # official: "we always use 3 scales"
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)  # Caffe2 "XavierFill"
                nn.init.zeros_(proj.bias)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Sequential())  # identity, no parameters
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, x: list[Tensor], mask_features: Tensor, mask: Tensor | None = None) -> dict:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature maps, got {len(x)}")
        del mask  # official: "disable mask, it does not affect performance"
        src, pos, size_list = [], [], []
        for i in range(self.num_feature_levels):
            size_list.append(x[i].shape[-2:])
            pos.append(self.pe_layer(x[i]).to(x[i].dtype).flatten(2).permute(2, 0, 1))  # [HW, B, C]
            s = self.input_proj[i](x[i]).flatten(2) + self.level_embed.weight[i][None, :, None]
            src.append(s.permute(2, 0, 1))  # [HW, B, C]
        bs = src[0].shape[1]
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)  # [Q, B, C]
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)

        predictions_class, predictions_mask = [], []
        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(output, mask_features, size_list[0])
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)
        for i in range(self.num_layers):
            level_index = i % self.num_feature_levels
            # a query that may see no pixel at all would get NaNs from softmax: let it see every pixel instead
            attn_mask = attn_mask & ~attn_mask.all(-1, keepdim=True)
            output = self.transformer_cross_attention_layers[i](
                output, src[level_index], memory_mask=attn_mask, memory_key_padding_mask=None,
                pos=pos[level_index], query_pos=query_embed)
            output = self.transformer_self_attention_layers[i](output, tgt_mask=None, tgt_key_padding_mask=None,
                                                               query_pos=query_embed)
            output = self.transformer_ffn_layers[i](output)
            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features, size_list[(i + 1) % self.num_feature_levels])
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)
        return {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": b}
                            for a, b in zip(predictions_class[:-1], predictions_mask[:-1])],
        }

    def forward_prediction_heads(self, output: Tensor, mask_features: Tensor, attn_mask_target_size):
        """Queries ``[Q, B, C]`` → class logits [B, Q, C+1], mask logits [B, Q, H/4, W/4] and the next layer's
        attention mask [B·heads, Q, h·w] (True = masked out: sigmoid of the resized mask logit < 0.5)."""
        decoder_output = self.post_norm(output).transpose(0, 1)  # [B, Q, C]
        outputs_class = self.class_embed(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        attn_mask = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return outputs_class, outputs_mask, attn_mask.detach()


class Mask2FormerHead(nn.Module):
    """DINOv3's segmentation head: ``MSDeformAttnPixelDecoder`` + ``MultiScaleMaskedTransformerDecoder``.

    ``input_shape``: the adapter's levels, e.g. ``{"1": [D, h, w, 4], ..., "4": [D, ...]}`` (official ShapeSpec;
    only the channel entry is used), or anything ``MSDeformAttnPixelDecoder`` accepts. ``hidden_dim`` is the
    pixel decoder's ``conv_dim = mask_dim`` and the query decoder's width. The keyword-only settings after
    ``transformer_in_feature`` are not official arguments: their defaults are the values the official file hard-codes
    (pixel decoder: 16 heads, FFN 4096, 6 layers; decoder: 100 queries, 16 heads, FFN 4096, 9 layers), so a
    smaller head can be built for a CPU with the same structure.

    ``forward(features)`` → the decoder's dict; ``predict(features, rescale_to)`` also resizes ``pred_masks``.
    State dict: ``pixel_decoder.*`` and ``predictor.*``, as the official.
    """

    def __init__(self, input_shape, hidden_dim: int = 2048, num_classes: int = 150, loss_weight: float = 1.0,
                 ignore_value: int = -1, transformer_in_feature: str = "multi_scale_pixel_decoder", *,
                 num_queries: int = 100, nheads: int = 16, dim_feedforward: int = 4096, dec_layers: int = 9,
                 enc_layers: int = 6, enc_nheads: int | None = None, enc_dim_feedforward: int | None = None):
        super().__init__()
        self.ignore_value = ignore_value
        self.common_stride = 4
        self.loss_weight = loss_weight
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            input_shape, conv_dim=hidden_dim, mask_dim=hidden_dim, num_heads=enc_nheads or nheads,
            dim_feedforward=enc_dim_feedforward or dim_feedforward, num_layers=enc_layers, dropout=0.0, norm="GN",
            transformer_in_features=("1", "2", "3", "4"), common_stride=4)
        self.in_features = self.pixel_decoder.in_features
        self.predictor = MultiScaleMaskedTransformerDecoder(
            in_channels=hidden_dim, mask_classification=True, num_classes=num_classes, hidden_dim=hidden_dim,
            num_queries=num_queries, nheads=nheads, dim_feedforward=dim_feedforward, dec_layers=dec_layers,
            pre_norm=False, mask_dim=hidden_dim, enforce_input_project=False)
        self.transformer_in_feature = transformer_in_feature
        self.num_classes = num_classes

    def layers(self, features, mask=None) -> dict:
        mask_features, _, multi_scale_features = self.pixel_decoder.forward_features(features)
        return self.predictor(multi_scale_features, mask_features, mask)

    def forward_features(self, features, mask=None) -> dict:
        return self.layers(features, mask)

    def forward(self, features, mask=None) -> dict:
        return self.forward_features(features, mask)

    def predict(self, features, mask=None, rescale_to=(512, 512)) -> dict:
        output = self.forward_features(features, mask)
        output["pred_masks"] = F.interpolate(output["pred_masks"], size=rescale_to, mode="bilinear",
                                             align_corners=False)
        return output


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Per-class scores ``[B, C, H, W]`` from ``pred_logits [B, Q, C+1]`` and ``pred_masks [B, Q, H, W]`` (logits):
    ``sum_q softmax(class)_q,c (no-object dropped) · sigmoid(mask)_q`` (official ``make_inference``, "m2f")."""
    mask_cls = F.softmax(pred_logits, dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", mask_cls.float(), pred_masks.sigmoid().float())
