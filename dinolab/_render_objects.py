"""ShapesWorld renderer, part 3: ``_render_objects``, the objects z-buffered into the depth map, the mask and an
object-colour canvas (shape tests, object textures, shading, visible areas and boxes, contact shadows).

The overview of the renderer is in :mod:`dinolab._render`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._render_scene import _CHECKER, _DOTS, _FLAT, _INF, _NOISE, _SHAPE, _STRIPES

_FAR = 1e6  # depth given to window pixels off the shape: never wins the z-test
_GROUP = 32  # object windows rendered together

# _render_objects packs every active object into one row of two tables, so that a group of
# objects is one slice. Columns of the float table:
_F_X, _F_Y, _F_Y_BASE, _F_RADIUS, _F_BULGE, _F_TEX_COS, _F_TEX_SIN, _F_Z_NEAR, _F_Y_WALL = range(9)
_F_EDGE_COS, _F_EDGE_SIN = 9, 14  # + k: edge normal k (k < 5)
_F_COLOR1, _F_COLOR_DIFF = slice(19, 22), slice(22, 25)  # colour 1 (RGB), colour 2 - colour 1
# Columns of the integer table (windows are pixel cells x0, y0, x1, y1, at + 0 .. + 3):
_I_SAMPLE, _I_SLOT, _I_CLASS, _I_TEXTURE, _I_NOISE_ROW, _I_NOISE_COL = range(6)  # noise: a patch offset
_I_OBJECT_WINDOW, _I_SHADOW_WINDOW = 6, 10


def _render_objects(
    world: Any, scene: dict[str, Tensor], zbuf: Tensor, mask: Tensor, scratch: dict[str, Tensor], layers: bool
) -> dict[str, Tensor]:
    """Z-buffer every object into pixel canvases; measure its visible area and box.

    Each object is rendered only inside its own window (its bounding box; shadows get thin
    windows of their own). Windows of one class and similar size are batched together, so
    each batch runs only its own shape test. That is many times less work than testing
    every pixel against every object, since most objects are small. Windows are merged into
    the canvases with order-independent scatter reductions (min depth; then, among exactly
    equal depths, the larger slot), so the result does not depend on how objects were
    grouped: a sample is bit-identical whether it is rendered alone or in a batch.
    """
    B, S, N = scene["active"].shape[0], world.size, world.n_objects[1]
    col = lambda t: t.reshape(-1, 1, 1)  # noqa: E731 - (G,) -> broadcastable over a window
    zbuf.copy_(scene["bg_z"].expand(B, S, S))  # the depth output itself serves as the z-buffer
    region = scratch["region"].copy_(scene["floor_row"].expand(B, S, S))  # 0 = wall, 1 = floor, 2 + j = object j
    obj_rgb = scratch["obj_rgb"].zero_()  # final object colours, 0 off objects
    mask.zero_()
    shadow = scratch["shadow"].zero_()
    noise = scratch["noise"]
    zflat, rflat = zbuf.view(-1), region.view(-1)

    # One row per active object: gather once up front, not in every group. Columns: _F_* and _I_*.
    obj_sample, obj_slot = scene["active"].nonzero(as_tuple=True)
    obj_float = torch.cat(
        [
            torch.stack([scene[k] for k in ("x_c", "y_c", "y_b", "r", "bulge", "t_cos", "t_sin")], -1),
            (scene["z_obj"] - scene["bulge"])[..., None],
            scene["y_w"][:, None, None].expand(B, N, 1),
            scene["n_cos"],
            scene["n_sin"],
            scene["c1"],
            scene["c2"] - scene["c1"],
        ],
        -1,
    )[obj_sample, obj_slot]  # (M, 25)
    x_c, y_c, y_b, r = (obj_float[:, k] for k in (_F_X, _F_Y, _F_Y_BASE, _F_RADIUS))
    cell = lambda v, d: torch.clamp(torch.floor(v * S).long() + d, 0, S - 1)  # noqa: E731 - 1 px margin
    obj_class = scene["cls"][obj_sample, obj_slot]
    noise_shift = scene["noise_shift"][obj_sample, obj_slot]
    obj_int = torch.stack(
        [
            obj_sample, obj_slot, obj_class, scene["tex"][obj_sample, obj_slot], noise_shift[:, 0], noise_shift[:, 1],
            cell(x_c - r, -1), cell(y_c - r, -1), cell(x_c + r, 1), cell(y_c + r, 1),  # object window
            cell(x_c - 1.3 * r, -1), cell(y_b - 0.3 * r, -1), cell(x_c + 1.3 * r, 1), cell(y_b + 0.3 * r, 1),  # shadow
        ],
        1,
    )  # (M, 14)

    def groups(window: int, by_class: bool):
        """Batches of rows of (obj_float, obj_int) with similar sizes of the window that starts at
        column ``window`` of obj_int, and their window pixels."""
        wx = obj_int[:, window + 2] - obj_int[:, window] + 1
        wy = obj_int[:, window + 3] - obj_int[:, window + 1] + 1
        key = wx * wy + (obj_class * (4 * S * S) if by_class else 0)
        order = torch.argsort(key, stable=True)
        all_float, all_int, wx, wy = obj_float[order], obj_int[order], wx[order], wy[order]
        classes = all_int[:, _I_CLASS].tolist() if by_class else [0] * len(order)
        starts = [g for g in range(len(classes)) if g == 0 or classes[g] != classes[g - 1]] + [len(classes)]
        for s, e in zip(starts[:-1], starts[1:]):
            for g0 in range(s, e, _GROUP):
                g1 = min(g0 + _GROUP, e)
                g_float, g_int = all_float[g0:g1], all_int[g0:g1]
                gx, gy = int(wx[g0:g1].max()), int(wy[g0:g1].max())
                # Windows that would cross the right/bottom edge move back inside: they
                # still cover the object's visible part, and every window pixel is real.
                cols = torch.clamp(g_int[:, window], max=S - gx)[:, None] + torch.arange(gx)  # (G, gx)
                rows = torch.clamp(g_int[:, window + 1], max=S - gy)[:, None] + torch.arange(gy)  # (G, gy)
                pix = (col(g_int[:, _I_SAMPLE] * S * S) + rows[:, :, None] * S + cols[:, None, :]).view(-1)
                wxs = ((cols.float() + 0.5) / S)[:, None, :]  # the same floats as the full grid
                wys = ((rows.float() + 0.5) / S)[:, :, None]
                yield classes[g0], g_float, g_int, rows, cols, pix, wxs, wys

    # Contact shadows: soft ellipses on the floor around each base.
    for _, g_float, _, _, _, pix, wxs, wys in groups(_I_SHADOW_WINDOW, by_class=False):
        ex = (wxs - col(g_float[:, _F_X])) / col(1.3 * g_float[:, _F_RADIUS])
        ey = (wys - col(g_float[:, _F_Y_BASE])) / col(0.3 * g_float[:, _F_RADIUS])
        soft = torch.clamp(1.0 - (ex * ex + ey * ey), min=0.0).mul_((wys > col(g_float[:, _F_Y_WALL])).float())
        shadow.view(-1).scatter_reduce_(0, pix, soft.view(-1), "amax")

    windows = []
    for c, g_float, g_int, rows, cols, pix, wxs, wys in groups(_I_OBJECT_WINDOW, by_class=True):
        dx = (wxs - col(g_float[:, _F_X])) / col(g_float[:, _F_RADIUS])  # (G, 1, gx), in radii
        dy = (wys - col(g_float[:, _F_Y])) / col(g_float[:, _F_RADIUS])  # (G, gy, 1)
        d2 = dx * dx + dy * dy
        shape = _SHAPE[c]
        if shape["nn"] == 0:  # circle, ring
            inside = d2 <= shape["r_out"] ** 2
            if shape["r_in"] > 0:
                inside &= d2 >= shape["r_in"] ** 2
        else:  # polygons: half-plane tests against the edge lines
            violations = None
            for k in range(shape["nn"]):
                v = (dx * col(g_float[:, _F_EDGE_COS + k]) + dy * col(g_float[:, _F_EDGE_SIN + k])) > shape["h"]
                if shape["allow"] == 0:
                    violations = v if violations is None else violations.logical_or_(v)
                else:
                    v = v.view(torch.uint8)
                    violations = v if violations is None else violations.add_(v)
            inside = ~violations if shape["allow"] == 0 else violations <= shape["allow"]
        z_win = torch.clamp(d2, max=1.0).mul_(col(g_float[:, _F_BULGE])).add_(col(g_float[:, _F_Z_NEAR]))
        z_win.add_((~inside).view(torch.uint8).float(), alpha=_FAR)  # off the shape: never wins
        zflat.scatter_reduce_(0, pix, z_win.view(-1), "amin")

        # Texture pattern in the object's own (rotated, scaled) frame, so it moves with it.
        tex = g_int[:, _I_TEXTURE]
        present = set(tex.tolist())
        t = torch.zeros(z_win.shape) if present - {_FLAT} else None  # None: all flat, t = 0
        is_tex = lambda k: col((tex == k).float())  # noqa: E731
        if present & {_STRIPES, _CHECKER, _DOTS}:
            tc, ts = col(g_float[:, _F_TEX_COS]), col(g_float[:, _F_TEX_SIN])
            # frac of a positive number (|u| < 5 here): torch.remainder is ~10x slower
            u = torch.frac((dx * tc + dy * ts).add_(8.0))
            v = torch.frac((dy * tc - dx * ts).add_(8.0)) if present & {_CHECKER, _DOTS} else None
            if present & {_STRIPES, _CHECKER}:
                half_u = u < 0.5
            if _STRIPES in present:
                t += is_tex(_STRIPES) * half_u.view(torch.uint8).float()
            if _CHECKER in present:
                t += is_tex(_CHECKER) * (half_u ^ (v < 0.5)).view(torch.uint8).float()
            if _DOTS in present:
                u, v = u - 0.5, v - 0.5
                t += is_tex(_DOTS) * (u.mul_(u).add_(v.mul_(v)) < 0.09).view(torch.uint8).float()
        if _NOISE in present:
            # the object's own patch of the noise image
            n_rows = (rows + g_int[:, _I_NOISE_ROW, None]) % S
            n_cols = (cols + g_int[:, _I_NOISE_COL, None]) % S
            npix = col(g_int[:, _I_SAMPLE] * S * S) + n_rows[:, :, None] * S + n_cols[:, None, :]
            t += is_tex(_NOISE) * noise.view(-1).index_select(0, npix.view(-1)).view(z_win.shape)
        shade = (0.98 - 0.12 * dy) - 0.3 * d2  # dome shading, lit from above: in [0.56, 0.992]
        windows.append((g_int[:, _I_SAMPLE], g_int[:, _I_SLOT], g_int[:, _I_CLASS], g_float, pix, rows, cols,
                        z_win, t, shade))

    # Who won each pixel: the nearest surface; among exactly equal depths, the larger slot.
    for b, j, _, _, pix, _, _, z_win, _, _ in windows:
        won = (z_win == zflat.index_select(0, pix).view(z_win.shape)).view(torch.uint8).float()  # never off-shape
        rflat.scatter_reduce_(0, pix, won.mul_(col((j + 2).float())).view(-1), "amax")
    obj_depth = torch.full((B * N * S * S,) if layers else (0,), _INF)
    stats = []
    for b, j, c, g_float, pix, rows, cols, z_win, t, shade in windows:
        vis = rflat.index_select(0, pix).view(z_win.shape) == col((j + 2).float())  # one object per pixel now
        visf = vis.view(torch.uint8).float()
        # Final colour (colour1 + (colour2 - colour1) * t) * shading; 0 where not visible, so
        # the sum over overlapping windows is exactly the visible object's colour.
        shade = shade.mul_(visf)[:, None]
        if t is None:
            rgb = g_float[:, _F_COLOR1, None, None] * shade
        else:
            rgb = (g_float[:, _F_COLOR_DIFF, None, None] * t[:, None]).add_(g_float[:, _F_COLOR1, None, None])
            rgb.mul_(shade)
        for ch in range(3):
            obj_rgb[ch].view(-1).scatter_reduce_(0, pix, rgb[:, ch].reshape(-1), "sum")
        mask.view(-1).scatter_reduce_(0, pix, (vis.view(torch.uint8).long() * col(c)).view(-1), "amax")
        # Tight box around the visible pixels, in pixel edges.
        r_any, c_any = vis.any(2), vis.any(1)
        y0 = torch.where(r_any, rows, S + 1).amin(1)
        y1 = torch.where(r_any, rows, -1).amax(1) + 1
        x0 = torch.where(c_any, cols, S + 1).amin(1)
        x1 = torch.where(c_any, cols, -1).amax(1) + 1
        stats.append((b, j, vis.sum((1, 2)), torch.stack([x0, y0, x1, y1], 1).float()))
        if layers:
            plane = pix.view(z_win.shape) + col((b * (N - 1) + j) * S * S)
            obj_depth[plane.view(-1)] = torch.where(z_win < _FAR / 2, z_win, _INF).view(-1)
    area = torch.zeros(B, N, dtype=torch.int64)
    boxes = torch.zeros(B, N, 4)
    if stats:
        st_sample, st_slot, st_area, st_box = (torch.cat(z) for z in zip(*stats))
        area[st_sample, st_slot] = st_area
        boxes[st_sample, st_slot] = st_box
    return dict(
        noise=noise, region=region, obj_rgb=obj_rgb, shadow=shadow, area=area, boxes=boxes, obj_depth=obj_depth
    )
