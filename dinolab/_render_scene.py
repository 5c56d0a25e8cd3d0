"""ShapesWorld renderer, part 2: ``_scene``, every random choice of a scene as small per-sample and per-object
tensors (camera and room, objects, colours, textures), and the shape and texture tables it draws from.

The overview of the renderer is in :mod:`dinolab._render`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._render_keys import _OBJECT_LAYOUT, _S_OBJ, _S_SCENE, _SCENE_LAYOUT, _STREAM, _uniform

# Shapes are tests on the offset p = (dx, dy) / radius, so every shape fits in the unit
# circle. Circle and ring: r_in^2 <= |p|^2 <= r_out^2. Polygons: the number of edge lines
# with <p, n_k> > h is at most `allow`. For square and triangle allow = 0 (an intersection of
# half-planes). The filled pentagram is the set of points beyond at most one of its five
# edge lines (allow = 1), so no atan2 is needed.
# Angles are integer steps of 2*pi / _ANGLES read from a table: the same table entry gives
# the same bits whether a sample is rendered alone or in a batch (no sin/cos kernels whose
# vectorised and scalar paths might differ in the last bit).
_ANGLES = 1200  # divisible by 3, 4 and 5
_COS = torch.tensor([math.cos(2 * math.pi * a / _ANGLES) for a in range(_ANGLES)], dtype=torch.float32)
_SIN = torch.tensor([math.sin(2 * math.pi * a / _ANGLES) for a in range(_ANGLES)], dtype=torch.float32)
_INF = float("inf")
_SQ = 0.98  # square's circumradius
# Per class id (the ids of dinolab.data.CLASS_NAMES; 0 is the background): number of edge
# normals, angle step between them, offset of the first normal from the object's angle, edge
# distance h, allowed violations, r_in, r_out (circle and ring), number of vertices, vertex
# angle offset and radius (to find the lowest point).
_SHAPE = {
    1: dict(nn=0, step=0, off=0, h=_INF, allow=0, r_in=0.0, r_out=0.97, nv=0, voff=0, vr=0.97),
    2: dict(nn=4, step=300, off=0, h=_SQ * math.sqrt(0.5), allow=0, r_in=0.0, r_out=1.0, nv=4, voff=150, vr=_SQ),
    3: dict(nn=3, step=400, off=200, h=0.5, allow=0, r_in=0.0, r_out=1.0, nv=3, voff=0, vr=1.0),
    4: dict(nn=5, step=240, off=0, h=math.cos(2 * math.pi / 5), allow=1, r_in=0.0, r_out=1.0, nv=5, voff=0, vr=1.0),
    5: dict(nn=0, step=0, off=0, h=_INF, allow=0, r_in=0.55, r_out=1.0, nv=0, voff=0, vr=1.0),
}
_NUM_CLASSES = 1 + len(_SHAPE)  # with the background


def _shape_table(key: str, dtype=torch.float32) -> Tensor:
    return torch.tensor([0] + [_SHAPE[c][key] for c in range(1, _NUM_CLASSES)], dtype=dtype)


_T_STEP = _shape_table("step", torch.int64)
_T_OFF = _shape_table("off", torch.int64)
_T_NV = _shape_table("nv", torch.int64)
_T_VOFF = _shape_table("voff", torch.int64)
_T_VR = _shape_table("vr")

# Texture ids: positions in dinolab.data.TEXTURES, FLOOR_TEXTURES and WALL_TEXTURES.
_FLAT, _STRIPES, _CHECKER, _DOTS, _NOISE = range(5)
_TILES, _PLANKS, _FLOOR_NOISE = range(3)
_GRADIENT, _WALL_STRIPES, _WALL_NOISE = range(3)

_FOCAL = 0.9  # focal length in image heights: image radius = F * radius_m / depth


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(...) HSV in [0, 1] -> (..., 3) RGB, branch-free."""
    k = torch.stack([(n + h * 6.0) % 6.0 for n in (5.0, 3.0, 1.0)], dim=-1)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - (v * s)[..., None] * ramp


def _lerp_range(rng: tuple[float, float], u: Tensor) -> Tensor:
    return rng[0] + (rng[1] - rng[0]) * u


def _scene(world: Any, keys: Tensor, app_keys: Tensor | None = None) -> dict[str, Tensor]:
    """Every random choice of the scenes, as small per-sample / per-object tensors.

    Layout numbers (``scene_u[:, :8]``, ``object_u[..., :5]``) come from ``keys``; appearance
    numbers (``scene_u[:, 8:]``, ``object_u[..., 5:]``) from ``app_keys`` (default: ``keys``)."""
    B, S, N = keys.shape[0], world.size, world.n_objects[1]
    palette = world._palette
    scene_u = _uniform(keys, _STREAM[_S_SCENE : _S_SCENE + 32])  # (B, 32)
    object_u = _uniform(keys, _STREAM[_S_OBJ : _S_OBJ + 32 * N].view(N, 32))  # (B, N, 32)
    if app_keys is not None and not torch.equal(app_keys, keys):
        scene_app = _uniform(app_keys, _STREAM[_S_SCENE + _SCENE_LAYOUT : _S_SCENE + 32])
        scene_u = torch.cat([scene_u[:, :_SCENE_LAYOUT], scene_app], 1)
        object_app = _uniform(app_keys, _STREAM[_S_OBJ : _S_OBJ + 32 * N].view(N, 32))
        object_u = torch.cat([object_u[..., :_OBJECT_LAYOUT], object_app[..., _OBJECT_LAYOUT:]], -1)

    def pick(choices: Tensor, u: Tensor) -> Tensor:
        return choices[torch.clamp(torch.floor(u * len(choices)).long(), max=len(choices) - 1)]

    # Camera and room. y_w = row where floor meets wall; solve the floor's
    # depth(y) = hf / (y - y_h) so that it is z_bot at the bottom edge and z_wall at y_w.
    y_w = 0.30 + 0.18 * scene_u[:, 0]
    z_wall = 7.0 + 3.0 * scene_u[:, 1]
    z_bot = 1.0 + 0.5 * scene_u[:, 2]
    y_h = (z_wall * y_w - z_bot) / (z_wall - z_bot)  # the horizon row
    hf = z_bot * (1.0 - y_h)  # the camera's height above the floor, times the focal length
    ys = ((torch.arange(S, dtype=torch.float32) + 0.5) / S).view(1, S, 1)  # pixel-centre rows
    z_floor = hf.view(B, 1, 1) / torch.clamp(ys - y_h.view(B, 1, 1), min=1e-6)  # huge above the horizon
    bg_z = torch.minimum(z_floor, z_wall.view(B, 1, 1))  # (B, S, 1): depends on the row only

    # Objects: one slot per possible object; slots past n_obj are inactive.
    lo, hi = world.n_objects
    n_obj = lo + torch.clamp(torch.floor(scene_u[:, 3] * (hi - lo + 1)).long(), max=hi - lo)
    active = torch.arange(N) < n_obj[:, None]
    cls = pick(world._class_ids, object_u[..., 0])
    # Base rows uniform between the farthest allowed depth and the bottom edge
    # (= uniform in inverse depth, as for things lying around on a real floor).
    yb_min = (y_h + hf / (0.55 * z_wall))[:, None]
    y_b = yb_min + (1.0 - yb_min) * object_u[..., 1]
    z_obj = hf[:, None] / (y_b - y_h[:, None])
    r_m = (0.18 + 0.18 * object_u[..., 2]) * world.object_scale  # radius in metres
    r = torch.clamp(_FOCAL * r_m / z_obj, min=0.025)  # radius in image heights
    x_c = 0.06 + 0.88 * object_u[..., 3]
    angle = torch.clamp(torch.floor(object_u[..., 4] * _ANGLES).long(), max=_ANGLES - 1)
    bulge = 0.5 * r_m  # dome height in metres: the centre is this much nearer than the rim

    # Edge normals (B, N, 5) and the lowest vertex, to stand each object on its base row.
    k5 = torch.arange(5)
    normal_angle = (angle[..., None] + _T_OFF[cls][..., None] + _T_STEP[cls][..., None] * k5) % _ANGLES
    n_vertices = _T_NV[cls]
    vertex_step = _ANGLES // torch.clamp(n_vertices, min=1)
    vertex_angle = (angle[..., None] + _T_VOFF[cls][..., None] + vertex_step[..., None] * k5) % _ANGLES
    lowest_sin = torch.where(k5 < n_vertices[..., None], _SIN[vertex_angle], torch.full((), -_INF)).amax(-1)
    below_centre = torch.where(n_vertices > 0, _T_VR[cls] * lowest_sin, _T_VR[cls])  # lowest point, in radii

    # Object textures: a pattern t in [0, 1] blends colour 1 into colour 2.
    tex = pick(world._tex_ids, object_u[..., 5])
    freq = 1.2 + 1.8 * object_u[..., 6]  # pattern periods per radius
    tex_angle = torch.clamp(torch.floor(object_u[..., 7] * _ANGLES).long(), max=_ANGLES - 1)
    hsv = lambda u0, u1, u2: _hsv_to_rgb(  # noqa: E731
        _lerp_range(palette.object_hue, u0) % 1.0, _lerp_range(palette.object_sat, u1),
        _lerp_range(palette.object_val, u2)
    )
    c1 = hsv(object_u[..., 8], object_u[..., 9], object_u[..., 10])
    c2 = hsv(object_u[..., 11], object_u[..., 12], object_u[..., 13])
    # "noise" blends into a darker version of colour 1 rather than into a second hue.
    c2 = torch.where((tex == _NOISE)[..., None], 0.45 * c1, c2)

    obj = dict(
        active=active, cls=cls, y_b=y_b, z_obj=z_obj, r=r, x_c=x_c, y_c=y_b - r * below_centre, bulge=bulge,
        n_cos=_COS[normal_angle], n_sin=_SIN[normal_angle], tex=tex,
        t_cos=_COS[tex_angle] * freq, t_sin=_SIN[tex_angle] * freq,
        noise_shift=torch.floor(object_u[..., 14:16] * S).long(),  # where a "noise" object cuts its noise from
        c1=c1, c2=c2,
    )
    # Far-to-near slot order, inactive slots last: instance ids and boxes come out sorted.
    order = torch.sort(torch.where(active, z_obj, -_INF), dim=1, descending=True, stable=True).indices
    for k, t in obj.items():
        obj[k] = torch.gather(t, 1, order if t.ndim == 2 else order[..., None].expand_as(t))
    obj["cls"] = torch.where(obj["active"], obj["cls"], 0)

    # Background appearance.
    background_u = scene_u[:, _SCENE_LAYOUT:]
    hue = _lerp_range(palette.background_hue, background_u[:, 0]) % 1.0
    floor_sat = _lerp_range(palette.floor_sat, background_u[:, 1])
    floor_val = _lerp_range(palette.floor_val, background_u[:, 2])
    floor_c1 = _hsv_to_rgb(hue, floor_sat, floor_val)
    floor_c2 = _hsv_to_rgb((hue + 0.15 * (background_u[:, 3] - 0.5)) % 1.0, floor_sat,
                           floor_val * (0.45 + 0.3 * background_u[:, 4]))
    wall_hue = (hue + 0.5 * background_u[:, 5]) % 1.0  # related to the floor's hue, not equal to it
    wall_sat = _lerp_range(palette.wall_sat, background_u[:, 6])
    wall_val = _lerp_range(palette.wall_val, background_u[:, 7])
    wall_c1 = _hsv_to_rgb(wall_hue, wall_sat, wall_val)
    wall_c2 = _hsv_to_rgb(wall_hue, wall_sat * 0.6, wall_val * (0.6 + 0.25 * background_u[:, 8]))
    floor_tex = pick(world._floor_ids, background_u[:, 9])
    tile = (0.35 + 0.4 * background_u[:, 10]) * torch.where(floor_tex == _PLANKS, 0.5, 1.0)  # planks: narrower
    return dict(
        obj,
        y_w=y_w, z_wall=z_wall, z_bot=z_bot, z_floor=z_floor, bg_z=bg_z, floor_row=(ys > y_w.view(B, 1, 1)).float(),
        floor_c1=floor_c1, floor_c2=floor_c2, wall_c1=wall_c1, wall_c2=wall_c2, floor_tex=floor_tex, tile=tile,
        floor_hue=hue, wall_tex=pick(world._wall_ids, background_u[:, 11]),
        wall_freq=6.0 + 14.0 * background_u[:, 12],
    )
