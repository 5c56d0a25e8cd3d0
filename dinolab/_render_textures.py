"""ShapesWorld renderer, part 4: texture noise and grain, and ``_compose``, which writes the image: floor and wall
patterns, haze, shadows and grain around the objects.

The overview of the renderer is in :mod:`dinolab._render`.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ._render_keys import _G_COARSE, _G_FINE, _S_COARSE, _S_FINE, _S_GRAIN, _STREAM, _streams, _uniform
from ._render_scene import _FLOOR_NOISE, _FOCAL, _GRADIENT, _PLANKS, _TILES, _WALL_NOISE, _WALL_STRIPES


@functools.lru_cache(maxsize=32)
def _lin_weights(g: int, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear interpolation from g + 1 lattice points to n samples, corners on corners."""
    src = torch.arange(n, dtype=torch.float64) * (g / max(n - 1, 1))
    i0 = torch.clamp(torch.floor(src).long(), max=g - 1)
    w1 = (src - i0).float()
    return i0, i0 + 1, 1.0 - w1, w1


def _upsample(lat: Tensor, n: int) -> Tensor:
    """(B, g+1, g+1) -> (B, n, n) bilinear, separably, by whole-row copies (index_select on dim 1),
    which is several times faster on CPU than F.interpolate or selecting columns."""
    i0, i1, w0, w1 = _lin_weights(lat.shape[-1] - 1, n)
    w0, w1 = w0[:, None], w1[:, None]
    t = lat.transpose(1, 2).contiguous()  # interpolate along x first, as rows
    x = t.index_select(1, i0).mul_(w0).add_(t.index_select(1, i1).mul_(w1))  # (B, n, g+1)
    x = x.transpose(1, 2).contiguous()  # (B, g+1, n)
    return x.index_select(1, i0).mul_(w0).add_(x.index_select(1, i1).mul_(w1))


def _noise(keys: Tensor, size: int) -> Tensor:
    """(B, size, size) two-octave value noise in [0, 1], from hashed lattices whose cell counts
    do not depend on size (so it is the same pattern at every resolution)."""
    def lattice(start: int, g: int) -> Tensor:
        return _uniform(keys, _STREAM[start : start + (g + 1) ** 2]).view(-1, g + 1, g + 1)

    two = 0.55 * _upsample(lattice(_S_COARSE, _G_COARSE), _G_FINE + 1) + 0.45 * lattice(_S_FINE, _G_FINE)
    # Interpolation and averaging shrink the spread of uniform noise: stretch it back.
    return torch.clamp(_upsample(0.5 + 2.0 * (two - 0.5), size), 0.0, 1.0)


def _grain(keys: Tensor, size: int) -> Tensor:
    """(B, size, size) per-pixel sensor grain: a brightness factor in [0.92, 1).

    frac(a(x) + b(y) + d(x + y)) of three hashed 1-D sequences looks like white noise but
    hashes 4 * size numbers per image instead of size**2.
    """
    B = keys.shape[0]
    u = _uniform(keys, _streams(_S_GRAIN, 4 * size))  # (B, 4 * size)
    a, b = u[:, :size].view(B, 1, size), u[:, size : 2 * size].view(B, size, 1)
    d = u[:, 2 * size :].contiguous()
    diag = torch.as_strided(d, (B, size, size), (2 * size, 1, 1))  # diag[b, y, x] = d[b, x + y]
    return torch.frac((a + b).add_(diag)).mul_(0.08).add_(0.92)


def _parity(f: Tensor) -> Tensor:
    """1.0 where the integer-valued f is odd, else 0.0 (via frac: torch.remainder is slow)."""
    return torch.frac(f.mul(0.5).add_(1 << 20)).mul_(2.0)  # the shift makes it positive


def _compose(world: Any, scene: dict[str, Tensor], canvas: dict[str, Tensor], keys: Tensor, chunk: slice,
             image: Tensor) -> None:
    """Write the images of samples ``chunk``: background colours and textures, then objects.

    Pixel-sized tensors dominate the cost here, so everything that depends on the row only
    (wall or floor, haze) is folded into (B, 3, S, 1) colour terms, and every factor stays
    in [0, 1] by construction, so no final clamp is needed.
    """
    S = world.size
    B = chunk.stop - chunk.start
    col = lambda t: t[chunk].reshape(-1, 1, 1)  # noqa: E731
    xs = ((torch.arange(S, dtype=torch.float32) + 0.5) / S).view(1, 1, S)
    ys = xs.view(1, S, 1)
    z_floor, floor_row, noise = scene["z_floor"][chunk], scene["floor_row"][chunk], canvas["noise"][chunk]
    is_tex = lambda ids, k: col((ids == k).float())  # noqa: E731

    # Floor pattern in floor-plane coordinates (metres), so it recedes in perspective:
    # tiles = parity(tile column) XOR parity(tile row); planks = parity(column) alone.
    floor_tex, tile = scene["floor_tex"], scene["tile"]
    present = set(floor_tex[chunk].tolist())
    t_floor = None
    if present & {_TILES, _PLANKS}:
        half_col = (xs - 0.5) * (z_floor / (2.0 * _FOCAL * col(tile)))  # tile column / 2
        odd_col = torch.frac(half_col.add_(1 << 20)) >= 0.5  # shifted positive first
        odd_row = (_parity(torch.floor(z_floor / col(tile))) * is_tex(floor_tex, _TILES)) > 0.5  # (B, S, 1)
        t_floor = (odd_col ^ odd_row).view(torch.uint8).float()
        if _FLOOR_NOISE in present:
            t_floor.mul_(1.0 - is_tex(floor_tex, _FLOOR_NOISE))
    if _FLOOR_NOISE in present:
        floor_noise = noise * is_tex(floor_tex, _FLOOR_NOISE)
        t_floor = floor_noise if t_floor is None else t_floor.add_(floor_noise)

    wall_tex = scene["wall_tex"]
    present = set(wall_tex[chunk].tolist())
    t_wall = torch.zeros(())
    if _GRADIENT in present:
        t_wall = t_wall + is_tex(wall_tex, _GRADIENT) * torch.clamp(ys / col(scene["y_w"]), max=1.0)
    if _WALL_STRIPES in present:
        t_wall = t_wall + is_tex(wall_tex, _WALL_STRIPES) * _parity(torch.floor(xs * col(scene["wall_freq"])))
    if _WALL_NOISE in present:
        t_wall = t_wall + is_tex(wall_tex, _WALL_NOISE) * noise
    t_bg = (t_floor * floor_row).add_(t_wall * (1.0 - floor_row))  # (B, S, S)

    # Per-row colours: c1 + (c2 - c1) * t. On the floor, haze pulls t toward 0.5 with the
    # distance: it hides tile aliasing near the horizon and is a depth cue.
    z_bot, z_wall = col(scene["z_bot"]), col(scene["z_wall"])
    haze = (0.85 * torch.clamp((z_floor - z_bot) / (z_wall - z_bot), 0.0, 1.0))[:, None]  # (B, 1, S, 1)
    f1, f2, w1, w2 = (scene[k][chunk].view(B, 3, 1, 1) for k in ("floor_c1", "floor_c2", "wall_c1", "wall_c2"))
    fr = floor_row[:, None]
    c1_row = fr * (f1 + 0.5 * haze * (f2 - f1)) + (1.0 - fr) * w1  # (B, 3, S, 1)
    dc_row = fr * ((f2 - f1) * (1.0 - haze)) + (1.0 - fr) * (w2 - w1)

    # Background light: shadows darken, objects hide it (their own colour is in obj_rgb,
    # 0 elsewhere); grain on everything. In place from here on.
    off_objects = (canvas["region"][chunk] < 2.0).view(torch.uint8).float()
    bg_light = canvas["shadow"][chunk].mul(-0.4).add_(1.0).mul_(off_objects)
    torch.mul(dc_row, t_bg[:, None], out=image)
    image.add_(c1_row).mul_(bg_light[:, None]).add_(canvas["obj_rgb"][:, chunk].transpose(0, 1))
    image.mul_(_grain(keys[chunk], S)[:, None])
