"""Patch embedding: an image becomes a grid of tokens.

A ``Conv2d`` with kernel = stride = patch size is exactly "cut the image into non-overlapping
patches, flatten each, multiply by one shared matrix" (notebook 01 checks this identity).
Names follow ``dinov3/layers/patch_embed.py`` so official weights load unchanged
(``patch_embed.proj.weight`` / ``.bias``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p, W/p, D), or (B, H/p * W/p, D) when ``flatten_embedding``.

    The official code silently crops images whose sides are not multiples of the patch size (the
    stride-p conv drops the remainder). We raise by default so that a wrong input size cannot go
    unnoticed; set ``strict_img_size=False`` to get the official cropping behaviour.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: type[nn.Module] | None = None,
        flatten_embedding: bool = True,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_hw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        self.img_size = img_hw
        self.patch_size = patch_hw
        self.patches_resolution = (img_hw[0] // patch_hw[0], img_hw[1] // patch_hw[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_hw, stride=patch_hw)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def check_input(self, x: Tensor) -> None:
        """Raise a ValueError that names the problem; never modifies anything."""
        if x.ndim != 4:
            raise ValueError(f"PatchEmbed expects a 4-D image batch (B, C, H, W), got shape {tuple(x.shape)}")
        _, c, h, w = x.shape
        ph, pw = self.patch_size
        if c != self.in_chans:
            raise ValueError(f"PatchEmbed expects {self.in_chans} input channels, got {c} (input shape {tuple(x.shape)})")
        if h < ph or w < pw:
            raise ValueError(f"image size {h}x{w} is smaller than one {ph}x{pw} patch")
        if self.strict_img_size and (h % ph or w % pw):
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}; resize or crop it to "
                f"{h // ph * ph}x{w // pw * pw} (the official code crops silently: set strict_img_size=False for that)"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major: h outer
        x = self.norm(x)
        if not self.flatten_embedding:
            x = x.reshape(-1, h, w, self.embed_dim)  # (B, h, w, D)
        return x

    def reset_parameters(self) -> None:
        # official init: U(-sqrt(k), sqrt(k)) with k = 1 / (in_chans * p_h * p_w), weight and bias alike
        k = 1 / (self.in_chans * self.patch_size[0] * self.patch_size[1])
        nn.init.uniform_(self.proj.weight, -math.sqrt(k), math.sqrt(k))
        if self.proj.bias is not None:
            nn.init.uniform_(self.proj.bias, -math.sqrt(k), math.sqrt(k))
