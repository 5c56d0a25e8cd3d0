"""2-D axial rotary position embedding (RoPE), as in ``dinov3/layers/rope_position_encoding.py``.

Each head dimension is split in two halves; dim ``j`` (j < D_head/2) is rotated together with dim
``j + D_head/2`` (the "rotate half" layout, not interleaved pairs). The first D_head/4 rotation
pairs turn with the patch's *row* coordinate, the next D_head/4 with its *column* coordinate.
Coordinates are patch centres normalised to [-1, 1], so the same angles are used at every
resolution: a model trained at 224 px sees the same coordinate range at 512 px.
There are no learnable weights: only the ``periods`` buffer (persistent, so it is in checkpoints).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def rope_rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] along the last dim (the 90-degree turn of each (j, j + D/2) pair)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate ``x`` (..., N, D_head) by the angles whose sin/cos are (N, D_head)."""
    return x * cos + rope_rotate_half(x) * sin


class RopePositionEmbedding(nn.Module):
    """Returns ``(sin, cos)``, each (H*W, D_head), for an H x W grid of patches.

    Exactly one parametrisation of the periods: ``base`` (periods = base ** (4k / D_head)) or
    ``min_period`` and ``max_period`` (geometric between the two).
    Training-time augmentations act on the coordinates only while ``self.training``:
    ``shift_coords`` (add U(-s, s) per axis), ``jitter_coords`` (multiply by exp(U(-log j, log j))
    per axis) and ``rescale_coords`` (one factor exp(U(-log r, log r)) for both axes).
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        num_heads: int,
        base: float | None = 100.0,
        min_period: float | None = None,
        max_period: float | None = None,
        normalize_coords: Literal["min", "max", "separate"] = "separate",
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(
                f"2-D RoPE needs embed_dim divisible by 4 * num_heads (two axes x sin/cos pairs): "
                f"embed_dim={embed_dim}, num_heads={num_heads}"
            )
        both = min_period is not None and max_period is not None
        if (base is not None) == both or (min_period is None) != (max_period is None):
            raise ValueError("give either base, or both min_period and max_period (and not base)")
        if normalize_coords not in ("min", "max", "separate"):
            raise ValueError(f"normalize_coords must be 'min', 'max' or 'separate', got {normalize_coords!r}")
        self.D_head = embed_dim // num_heads
        self.base = base
        self.min_period = min_period
        self.max_period = max_period
        self.normalize_coords = normalize_coords
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        self.dtype = _DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
        self.register_buffer("periods", torch.empty(self.D_head // 4, device=device, dtype=self.dtype), persistent=True)
        self._init_weights()

    def _init_weights(self) -> None:
        device, n = self.periods.device, self.D_head // 4
        if self.base is not None:
            periods = self.base ** (2 * torch.arange(n, device=device, dtype=torch.float32) / (self.D_head // 2))
        else:
            ratio = self.max_period / self.min_period
            exponents = torch.linspace(0, 1, n, device=device, dtype=torch.float32)
            periods = ratio**exponents / ratio * self.max_period
        self.periods.data = periods.to(self.dtype)

    def coords(self, H: int, W: int) -> Tensor:
        """Patch-centre coordinates in [-1, 1], (H*W, 2) with column 0 = row (h), column 1 = col (w)."""
        dd = {"device": self.periods.device, "dtype": self.dtype}
        if self.normalize_coords == "max":
            m = max(H, W)
            ch, cw = torch.arange(0.5, H, **dd) / m, torch.arange(0.5, W, **dd) / m
        elif self.normalize_coords == "min":
            m = min(H, W)
            ch, cw = torch.arange(0.5, H, **dd) / m, torch.arange(0.5, W, **dd) / m
        else:
            ch, cw = torch.arange(0.5, H, **dd) / H, torch.arange(0.5, W, **dd) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)  # (HW, 2)
        coords = 2.0 * coords - 1.0
        if self.training:
            coords = self._augment(coords)
        return coords

    def _augment(self, coords: Tensor) -> Tensor:
        dd = {"device": coords.device, "dtype": coords.dtype}
        if self.shift_coords is not None:
            coords = coords + torch.empty(2, **dd).uniform_(-self.shift_coords, self.shift_coords)[None, :]
        if self.jitter_coords is not None:
            lim = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, **dd).uniform_(-lim, lim).exp()[None, :]
        if self.rescale_coords is not None:
            lim = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, **dd).uniform_(-lim, lim).exp()
        return coords

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        coords = self.coords(H, W)  # (HW, 2)
        angles = 2 * math.pi * coords[:, :, None] / self.periods[None, None, :]  # (HW, 2, D/4)
        angles = angles.flatten(1, 2).tile(2)  # (HW, D): [h-angles, w-angles, h-angles, w-angles]
        return torch.sin(angles), torch.cos(angles)
