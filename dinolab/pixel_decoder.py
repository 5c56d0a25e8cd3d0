"""Mask2Former's multi-scale deformable-attention pixel decoder, as configured by DINOv3.

The pixel decoder turns the adapter's four feature maps ``{"1": f1, "2": f2, "3": f3, "4": f4}`` (strides 4, 8,
16, 32, all with the backbone width D) into

* ``multi_scale_features``: the three coarse levels after a deformable transformer *encoder* — [1/32, 1/16, 1/8],
  coarse to fine, each with ``conv_dim`` channels. The Mask2Former transformer decoder cross-attends to them,
  one level per decoder layer.
* ``mask_features``: a stride-4 map with ``mask_dim`` channels, made by one FPN step (the encoder's 1/8 output,
  upsampled, plus a lateral projection of f1) and a 1×1 conv. Each mask query's embedding is dotted with it
  to give that query's mask.

Structure (official ``dinov3/eval/segmentation/models/heads/pixel_decoder.py``, from Mask2Former):

1. ``input_convs[i]``: 1×1 conv + GroupNorm(32) on f4, f3, f2 (coarse first) → ``conv_dim`` channels.
2. Position: a fixed sine embedding (``PositionEmbeddingSine(conv_dim // 2, normalize=True)``) of each level,
   plus a learned per-level vector ``encoder.level_encoding[l]`` so tokens know which scale they come from.
3. Flatten the three levels into one token sequence (16²+32²+64² = 5376 tokens at 512² input) and run
   ``num_layers`` post-norm encoder layers: deformable self-attention (every token is a query, its reference
   point is its own pixel centre on every level) and a ReLU FFN.
4. FPN step: ``lateral_convs[0]`` (1×1, no bias, GN) on f1, add the bilinearly upsampled 1/8 encoder output,
   ``output_convs[0]`` (3×3, no bias, GN, ReLU).
5. ``mask_feature``: 1×1 conv → ``mask_dim``.

The sine embedding of step 2 is :mod:`dinolab.position_encoding` and the encoder of steps 2-3 is
:mod:`dinolab.msdeform_encoder` (both also importable from here); this file is the decoder that wires them up
with the convs of steps 1, 4 and 5.

The official DINOv3 head uses conv_dim = mask_dim = 2048, 16 heads, FFN 4096, 6 layers, dropout 0
(:data:`DINOV3_M2F_CONFIG`, the defaults here). Parameter names follow the official module, so its state dict
(the ``pixel_decoder.`` part of a Mask2FormerHead checkpoint) loads with ``strict=True``::

    input_convs.{0,1,2}.{0: Conv2d, 1: GroupNorm}.{weight,bias}
    encoder.level_encoding                                         (3, conv_dim)
    encoder.encoder.layers.{i}.self_attn.{sampling_offsets,attention_weights,value_proj,output_proj}.{weight,bias}
    encoder.encoder.layers.{i}.{norm1,linear1,linear2,norm2}.{weight,bias}
    mask_feature.{weight,bias}
    lateral_convs.0.weight, lateral_convs.0.norm.{weight,bias}
    output_convs.0.weight,  output_convs.0.norm.{weight,bias}

Differences from the official module, none of which changes a parameter or an output:

* ``forward(features)`` returns ``(mask_features, multi_scale_features)``; ``forward_features`` returns the
  official triple ``(mask_features, coarsest encoder map, multi_scale_features)``.
* Inputs are validated (missing levels, wrong channels) instead of failing deep inside.
* The official casts inputs to float32 under ``autocast(enabled=False)`` (its deformable attention has no
  half-precision kernel); here half inputs are cast to float32 the same way but float64 stays float64, so the
  tests can compare in double precision. Deformable attention is :mod:`dinolab.msdeform`, which also has a
  backward on the CPU (the official needs a compiled CUDA op to train this).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msdeform_encoder import (  # noqa: F401 (the encoder classes are re-exported: the tests import them from here)
    MSDeformAttnTransformerEncoder,
    MSDeformAttnTransformerEncoderLayer,
    MSDeformAttnTransformerEncoderOnly,
)
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "DINOV3_M2F_CONFIG",
    "PositionEmbeddingSine",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderOnly",
    "Conv2d",
    "MSDeformAttnPixelDecoder",
    "pixel_decoder_shapes",
]

# The pixel decoder inside DINOv3's Mask2FormerHead(hidden_dim=2048) (mask2former_head.py).
DINOV3_M2F_CONFIG = dict(
    conv_dim=2048, mask_dim=2048, num_heads=16, dim_feedforward=4096, num_layers=6, num_points=4, dropout=0.0,
    norm="GN", transformer_in_features=("1", "2", "3", "4"), common_stride=4,
)

_NUM_ENCODER_LEVELS = 3  # official: ``transformer_num_feature_levels = 3`` (hard-coded), "always use 3 scales"


class Conv2d(nn.Conv2d):
    """detectron2's Conv2d: a conv with an optional ``norm`` submodule and ``activation`` function after it
    (so the state dict has ``weight`` and ``norm.weight`` / ``norm.bias``)."""

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def _c2_xavier_fill(module: nn.Module) -> None:
    """Caffe2's "XavierFill" = kaiming_uniform_(a=1); bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def _get_norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "":
        return None
    raise ValueError(f"norm must be 'GN' (official) or '' (none), got {norm!r}")


def _parse_in_channels(in_channels) -> dict[str, int]:
    """dict name -> channels | ShapeSpec [C, H, W, stride]; list of 4 ints; or one int for all 4 levels.

    Returns the levels finest first: a dict keeps its order, except that ShapeSpec entries are (stably) sorted
    by their stride like the official (DINOv3 gives every level stride 4, so its order stays "1".."4").
    """
    if isinstance(in_channels, int):
        return {str(i + 1): in_channels for i in range(4)}
    if isinstance(in_channels, Mapping):
        items = list(in_channels.items())
        if items and all(isinstance(v, Sequence) and not isinstance(v, str) for _, v in items):
            items = sorted(items, key=lambda kv: kv[1][-1])  # ShapeSpec: sort by stride (stable)
            return {str(k): int(v[0]) for k, v in items}
        return {str(k): int(v) for k, v in items}
    if isinstance(in_channels, Sequence) and not isinstance(in_channels, str):
        return {str(i + 1): int(c) for i, c in enumerate(in_channels)}
    raise TypeError(f"in_channels must be an int, a list of ints or a dict, got {type(in_channels).__name__}")


class MSDeformAttnPixelDecoder(nn.Module):
    """Deformable-attention encoder over the three coarse levels + one FPN step to stride 4.

    Args:
        in_channels: channels of the input levels, finest (stride 4) first: one int (the adapter gives every
            level the backbone width D), a list like ``[D, D, D, D]`` (named "1".."4"), a dict
            ``{"1": D, ...}``, or the official ``input_shape`` dict ``{"1": [C, H, W, stride], ...}``.
        conv_dim: width of the encoder and the FPN (official DINOv3: 2048).
        mask_dim: channels of ``mask_features`` (2048).
        num_heads: deformable-attention heads (16).
        dim_feedforward: encoder FFN hidden width (4096).
        num_layers: encoder layers (6).
        num_points: sampling points per head and level (4).
        dropout: encoder dropout (0.0).
        norm: "GN" (GroupNorm(32), official) or "" for the lateral/output convs.
        transformer_in_features: the official passes all four names ``("1", "2", "3", "4")`` and the encoder
            takes the **three coarsest** of them ("4", "3", "2"; the official drops the finest with a
            ``[::-1][:-1]``). Passing just the three, e.g. ``("2", "3", "4")``, means the same.
        common_stride: kept for parity (4); the FPN step is always one level, like the official.

    ``forward(features)`` with ``features = {"1": [B, C1, H/4, W/4], ..., "4": [B, C4, H/32, W/32]}`` (or a list in
    that order) returns ``(mask_features [B, mask_dim, H/4, W/4], multi_scale_features)`` where
    ``multi_scale_features`` = encoder outputs at [1/32, 1/16, 1/8], coarse to fine, each [B, conv_dim, ., .].
    """

    def __init__(
        self,
        in_channels,
        conv_dim: int = 2048,
        mask_dim: int = 2048,
        num_heads: int = 16,
        dim_feedforward: int = 4096,
        num_layers: int = 6,
        num_points: int = 4,
        dropout: float = 0.0,
        norm: str = "GN",
        transformer_in_features: Sequence[str] = ("1", "2", "3", "4"),
        common_stride: int = 4,
    ):
        super().__init__()
        channels = _parse_in_channels(in_channels)
        if conv_dim % 32 != 0:
            raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm(32, conv_dim)), got {conv_dim}")
        if conv_dim % num_heads != 0:
            raise ValueError(f"conv_dim ({conv_dim}) must be divisible by num_heads ({num_heads})")
        if (conv_dim // 2) % 2 != 0:
            raise ValueError(f"conv_dim // 2 must be even for the sine embedding, got conv_dim={conv_dim}")
        self.in_features = list(channels)  # finest first, e.g. ["1", "2", "3", "4"]
        self.feature_channels = [channels[k] for k in self.in_features]
        tin = [str(f) for f in transformer_in_features]
        unknown = [f for f in tin if f not in channels]
        if unknown:
            raise ValueError(f"transformer_in_features {unknown} are not input levels {self.in_features}")
        tin = [f for f in self.in_features if f in tin]  # same order as the inputs (finest first)
        if len(tin) < _NUM_ENCODER_LEVELS:
            raise ValueError(f"the encoder needs {_NUM_ENCODER_LEVELS} levels, transformer_in_features has {tin}")
        self.transformer_in_features = tin
        # the three coarsest, coarse first (official: transformer_in_features[::-1][:-1] with 4 names)
        self.encoder_features = tin[::-1][:_NUM_ENCODER_LEVELS]
        self.fpn_feature = self.in_features[0]  # official: in_features[0], the stride-4 level
        if self.fpn_feature in self.encoder_features:
            raise ValueError(f"the FPN level {self.fpn_feature!r} must not also be an encoder level "
                             f"{self.encoder_features}: give the stride-4 level first")
        self.transformer_num_feature_levels = _NUM_ENCODER_LEVELS
        self.maskformer_num_feature_levels = _NUM_ENCODER_LEVELS
        self.common_stride = common_stride
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim

        # 1. input projections, coarse to fine ("4", "3", "2")
        self.input_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels[f], conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for f in self.encoder_features
        )
        for proj in self.input_convs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        # 2-3. encoder (+ level encoding) and the sine position embedding
        self.encoder = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim, nhead=num_heads, num_encoder_layers=num_layers, dim_feedforward=dim_feedforward,
            dropout=dropout, num_feature_levels=_NUM_ENCODER_LEVELS, enc_n_points=num_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        # 5. mask features (official defines it before the FPN convs; the order does not matter for loading)
        self.mask_feature = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        _c2_xavier_fill(self.mask_feature)

        # 4. one FPN step on the stride-4 level
        use_bias = norm == ""
        lateral_conv = Conv2d(channels[self.fpn_feature], conv_dim, kernel_size=1, bias=use_bias,
                              norm=_get_norm(norm, conv_dim))
        output_conv = Conv2d(conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                             norm=_get_norm(norm, conv_dim), activation=F.relu)
        _c2_xavier_fill(lateral_conv)
        _c2_xavier_fill(output_conv)
        self.lateral_convs = nn.ModuleList([lateral_conv])
        self.output_convs = nn.ModuleList([output_conv])

    # ----------------------------------------------------------------------------------------------- inputs
    def _check_features(self, features) -> dict[str, Tensor]:
        if isinstance(features, (list, tuple)):
            if len(features) != len(self.in_features):
                raise ValueError(f"expected {len(self.in_features)} feature maps (finest first), got {len(features)}")
            features = dict(zip(self.in_features, features))
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a dict {{name: [B, C, H, W]}} or a list, got {type(features).__name__}")
        needed = [self.fpn_feature, *self.encoder_features[::-1]]
        missing = [k for k in needed if k not in features]
        if missing:
            raise KeyError(f"missing feature levels {missing}; got {sorted(features)} and need {needed}")
        B = None
        for k in needed:
            x = features[k]
            c = self.feature_channels[self.in_features.index(k)]
            if not isinstance(x, Tensor) or x.dim() != 4:
                raise ValueError(f"feature {k!r} must be a [B, C, H, W] tensor, got "
                                 f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
            if x.shape[1] != c:
                raise ValueError(f"feature {k!r} has {x.shape[1]} channels, the decoder was built for {c}")
            if B is not None and x.shape[0] != B:
                raise ValueError(f"feature {k!r} has batch size {x.shape[0]}, others have {B}")
            B = x.shape[0]
        return features

    @staticmethod
    def _float(x: Tensor) -> Tensor:
        # deformable attention does not support half precision (official: ``.float()`` under autocast off)
        return x if x.dtype in (torch.float32, torch.float64) else x.float()

    # ---------------------------------------------------------------------------------------------- forward
    def forward_features(self, features) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Official return value: ``(mask_features, encoder output at 1/32, multi_scale_features)``."""
        features = self._check_features(features)
        device_type = next(iter(features.values())).device.type
        no_autocast = (torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda")
                       else contextlib.nullcontext())
        with no_autocast:
            srcs, pos = [], []
            for idx, f in enumerate(self.encoder_features):  # "4", "3", "2"
                x = self._float(features[f])
                srcs.append(self.input_convs[idx](x))
                pos.append(self.pe_layer(x))
            y, spatial_shapes, _ = self.encoder(srcs, pos)
            bs = y.shape[0]
            sizes = [h * w for h, w in spatial_shapes]
            out = [z.transpose(1, 2).reshape(bs, -1, h, w) for z, (h, w) in zip(y.split(sizes, dim=1), spatial_shapes)]

            # FPN step on the stride-4 level
            x = self._float(features[self.fpn_feature])
            cur_fpn = self.lateral_convs[0](x)
            y = cur_fpn + F.interpolate(out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[0](y))

            multi_scale_features = out[: self.maskformer_num_feature_levels]
            return self.mask_feature(out[-1]), out[0], multi_scale_features

    def forward(self, features) -> tuple[Tensor, list[Tensor]]:
        """``(mask_features [B, mask_dim, H/4, W/4], [enc 1/32, enc 1/16, enc 1/8])``."""
        mask_features, _, multi_scale_features = self.forward_features(features)
        return mask_features, multi_scale_features


def pixel_decoder_shapes(batch_size: int = 4, image_size: int = 512, in_channels: int = 1024,
                         conv_dim: int = 2048, mask_dim: int = 2048, num_heads: int = 16, num_points: int = 4,
                         dim_feedforward: int = 4096) -> dict[str, tuple[int, ...]]:
    """Tensor shapes through the pixel decoder, computed by arithmetic (nothing is run).

    Defaults: the seed's example (B=4, 512×512, ViT-L adapter features D=1024) and DINOv3's M2F pixel
    decoder (conv_dim = mask_dim = 2048, 16 heads, FFN 4096). ``tests/test_pixel_decoder.py`` checks these
    against a meta-device forward.
    """
    B, D, C = batch_size, in_channels, conv_dim
    s = [image_size // st for st in (4, 8, 16, 32)]
    n = [x * x for x in s[1:]][::-1]  # tokens of 1/32, 1/16, 1/8
    N = sum(n)
    L, M, P = _NUM_ENCODER_LEVELS, num_heads, num_points
    return {
        "input f1 (1/4)": (B, D, s[0], s[0]),
        "input f2 (1/8)": (B, D, s[1], s[1]),
        "input f3 (1/16)": (B, D, s[2], s[2]),
        "input f4 (1/32)": (B, D, s[3], s[3]),
        "input_convs[0](f4)": (B, C, s[3], s[3]),
        "input_convs[1](f3)": (B, C, s[2], s[2]),
        "input_convs[2](f2)": (B, C, s[1], s[1]),
        "level_encoding": (L, C),
        "tokens (flattened)": (B, N, C),
        "spatial_shapes": ((s[3], s[3]), (s[2], s[2]), (s[1], s[1])),
        "level_start_index": (0, n[0], n[0] + n[1]),
        "reference_points": (B, N, L, 2),
        "sampling_offsets": (B, N, M, L, P, 2),
        "attention_weights": (B, N, M, L, P),
        "value (per head)": (B, N, M, C // M),
        "ffn hidden": (B, N, dim_feedforward),
        "encoder output": (B, N, C),
        "multi_scale_features[0] (1/32)": (B, C, s[3], s[3]),
        "multi_scale_features[1] (1/16)": (B, C, s[2], s[2]),
        "multi_scale_features[2] (1/8)": (B, C, s[1], s[1]),
        "lateral_convs[0](f1)": (B, C, s[0], s[0]),
        "output_convs[0] (FPN 1/4)": (B, C, s[0], s[0]),
        "mask_features": (B, mask_dim, s[0], s[0]),
    }
