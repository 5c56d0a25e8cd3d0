"""Multi-scale deformable attention (Deformable DETR), as in ``dinov3/eval/segmentation/models/utils/ms_deform_attn.py``.

Each query, in each head, reads ``P`` points per pyramid level (bilinear, zeros outside the map) and sums them
with its attention weights. Shapes: value [B, ΣHW, heads, d] (levels flattened row-major and concatenated),
sampling_locations [B, Lq, heads, L, P, 2] as (x, y) in [0, 1] with (0, 0) the top-left *corner*,
attention_weights [B, Lq, heads, L, P] -> [B, Lq, heads·d]. Notebook 07 builds it step by step.

:func:`ms_deform_attn` is the official ``ms_deform_attn_core_pytorch`` (one ``F.grid_sample`` per level).
``fused=True`` computes the same numbers as one weighted gather-sum (``F.embedding_bag``) with a hand-written
backward: faster on a CPU (tests/benchmarks/msdeform_speed.py). It lives in :mod:`dinolab.msdeform_fused`, whose
comments explain it; this file is the readable path.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .msdeform_fused import _MSDeformAttnFunction

__all__ = ["ms_deform_attn", "ms_deform_attn_core_pytorch", "MSDeformAttn"]


# ---------------------------------------------------------------------------------------------------------------
# The core
# ---------------------------------------------------------------------------------------------------------------


def ms_deform_attn_core_pytorch(value: Tensor, shapes: Sequence[tuple[int, int]], sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """The official pure-PyTorch core: per level, ``F.grid_sample`` every (batch, head) value map at its
    queries' points, then the attention-weighted sum over levels and points. Shapes as in the module docstring."""
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in shapes], dim=1)
    sampling_grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampling_value_list = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, h·w, M, D] -> [B·M, D, h, w]
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        # [B, Lq, M, P, 2] -> [B·M, Lq, P, 2]
        grid_l = sampling_grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # [B·M, D, Lq, P]: bilinear, zeros outside the map, pixel i's centre at (i + 0.5) / w
        sampling_value_list.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B, Lq, M, L, P] -> [B·M, 1, Lq, L·P]
    attention_weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L * P)
    output = (torch.stack(sampling_value_list, dim=-2).flatten(-2) * attention_weights).sum(-1)  # [B·M, D, Lq]
    return output.view(B, M * D, Lq).transpose(1, 2).contiguous()


def _as_shapes(spatial_shapes, device) -> tuple[list[tuple[int, int]], Tensor]:
    """Accept a LongTensor [L, 2] or a list of (H, W); return both a python list and a LongTensor."""
    if isinstance(spatial_shapes, Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must have shape [L, 2] (H, W), got {tuple(spatial_shapes.shape)}")
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    else:
        shapes = [tuple(int(v) for v in hw) for hw in spatial_shapes]
        if any(len(hw) != 2 for hw in shapes):
            raise ValueError(f"spatial_shapes must be a list of (H, W) pairs, got {spatial_shapes!r}")
    if len(shapes) == 0:
        raise ValueError("spatial_shapes is empty: need at least one level")
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"spatial_shapes must be positive, got {shapes}")
    return shapes, torch.tensor(shapes, dtype=torch.long, device=device)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    fused: bool = False,
) -> Tensor:
    """Multi-scale deformable attention core (pure PyTorch, differentiable w.r.t. all three tensors).

    Args:
        value: [B, ΣHW, heads, d] — the flattened levels, concatenated level after level, row-major (y, x).
        spatial_shapes: LongTensor [L, 2] or list of (H, W) per level.
        sampling_locations: [B, Lq, heads, L, P, 2] as (x, y) in [0, 1] (values outside read zeros).
        attention_weights: [B, Lq, heads, L, P] (normally softmaxed over L·P; not required here).
        fused: False: :func:`ms_deform_attn_core_pytorch` (grid_sample, the official code); True: the same numbers
            as one weighted gather-sum with its own backward, faster on a CPU (see :mod:`dinolab.msdeform_fused`).

    Returns:
        [B, Lq, heads·d].
    """
    shapes, _ = _as_shapes(spatial_shapes, value.device)
    if value.dim() != 4:
        raise ValueError(f"value must be [B, ΣHW, heads, d], got shape {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be [B, Lq, heads, L, P, 2], got shape {tuple(sampling_locations.shape)}"
        )
    B, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    total = sum(h * w for h, w in shapes)
    if total != S:
        raise ValueError(f"ΣHW of spatial_shapes {shapes} is {total} != value.shape[1] = {S}")
    if len(shapes) != L:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels but sampling_locations has L = {L}")
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != M:
        raise ValueError(
            f"sampling_locations (batch, heads) = {(sampling_locations.shape[0], sampling_locations.shape[2])} "
            f"!= value (batch, heads) = {(B, M)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(attention_weights.shape)} != sampling_locations.shape[:-1] = "
            f"{tuple(sampling_locations.shape[:-1])}"
        )
    if not value.is_floating_point():
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    loc = sampling_locations.to(value.dtype)
    attn = attention_weights.to(value.dtype)
    if fused:
        return _MSDeformAttnFunction.apply(value, loc, attn, tuple(shapes))
    return ms_deform_attn_core_pytorch(value, shapes, loc, attn)


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module with the official (Deformable-DETR / DINOv3) interface.

    Args:
        d_model: query / input / output channels.
        n_levels: number of feature levels L.
        n_heads: number of heads.
        n_points: sampling points P per (head, level).
        ratio: value channels = ``int(d_model * ratio)`` (the DINOv3 adapter uses 0.5; the pixel decoder 1.0).
            Each head gets ``int(d_model * ratio) // n_heads`` of them.
        fused: use the fused CPU core (``ms_deform_attn(..., fused=True)``); same numbers. A plain attribute,
            so it can also be switched on a built model.

    Parameters (official names): ``sampling_offsets`` Linear(d_model, heads·L·P·2), ``attention_weights``
    Linear(d_model, heads·L·P), ``value_proj`` Linear(d_model, int(d_model·ratio)), ``output_proj``
    Linear(int(d_model·ratio), d_model).

    Differences from the official class: ``input_level_start_index`` may be omitted (it is recomputed), the
    heads must also divide ``int(d_model * ratio)`` (the official code fails later in a ``view`` otherwise), and
    there is no "per-head dim should be a power of 2" warning (that only concerned the CUDA kernel).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, ratio: float = 1.0,
                 fused: bool = False):
        super().__init__()
        # The official module checks d_model % n_heads; with ratio != 1 it then views the value as
        # [.., heads, int(d_model*ratio) // heads], which only works if heads also divides the scaled width.
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        value_dim = int(d_model * ratio)
        if value_dim <= 0 or value_dim % n_heads != 0:
            raise ValueError(
                f"int(d_model * ratio) = int({d_model} * {ratio}) = {value_dim} must be a positive multiple of "
                f"n_heads = {n_heads}"
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.ratio = ratio
        self.value_dim = value_dim
        self.fused = fused
        self.im2col_step = 64  # kept for parity with the official module; unused by the PyTorch core

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official init: offsets start on a ring of head directions, attention starts uniform."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h points in direction theta_h = 2πh/heads, scaled so the larger of |cos|, |sin| is 1 (the ring
        # becomes a square: offsets land on pixel neighbours); point i goes i+1 pixels far. Same for every level.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor | None = None,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: [B, Lq, d_model].
            reference_points: [B, Lq, L, 2] (x, y) in [0, 1], top-left (0, 0); or [B, Lq, L, 4] boxes
                (cx, cy, w, h), where offsets are then scaled by the box size.
            input_flatten: [B, ΣHW, d_model], levels concatenated.
            input_spatial_shapes: LongTensor [L, 2] of (H, W).
            input_level_start_index: [L] start of each level in input_flatten (accepted for API parity; the
                starts are recomputed from the shapes).
            input_padding_mask: [B, ΣHW] bool, **True = padding** (value zeroed there).

        Returns:
            [B, Lq, d_model].
        """
        B, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        shapes, shapes_t = _as_shapes(input_spatial_shapes, query.device)
        if len(shapes) != self.n_levels:
            raise ValueError(f"got {len(shapes)} levels in input_spatial_shapes, module has n_levels={self.n_levels}")
        total = sum(h * w for h, w in shapes)
        if total != S:
            raise ValueError(f"ΣHW of input_spatial_shapes {shapes} is {total} != input_flatten.shape[1] = {S}")
        if reference_points.dim() != 4 or reference_points.shape[:3] != (B, Lq, self.n_levels):
            raise ValueError(
                f"reference_points must be [B, Lq, L, 2|4] = [{B}, {Lq}, {self.n_levels}, 2|4], "
                f"got {tuple(reference_points.shape)}"
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, self.n_heads, self.value_dim // self.n_heads)

        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)
        attn = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)

        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l) to get normalised units
            normalizer = torch.stack([shapes_t[:, 1], shapes_t[:, 0]], -1).to(offsets.dtype)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the box: ±P/P · half the box size at most for unit offsets
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}")

        out = ms_deform_attn(value, shapes, loc, attn, fused=self.fused)
        return self.output_proj(out)
