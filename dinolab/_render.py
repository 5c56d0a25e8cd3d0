"""The ShapesWorld renderer (private: the public dataset is :class:`dinolab.data.ShapesWorld`).

What a scene is, what depth and labels mean and why everything is a hash of a sample key is
explained in :mod:`dinolab.data`. This file is how it is done:

1. keys: ``_sample_keys`` turns (split, seed, index) into a 32-bit key, ``_uniform`` hashes a
   key into as many uniform numbers as needed (no global RNG anywhere);
2. ``_scene``: every random choice of a scene (camera, room, objects, colours, textures) as
   small per-sample and per-object tensors;
3. ``_render_objects``: z-buffer the objects into the depth map, the mask and an object-colour
   canvas, each object only inside its own window;
4. ``_compose``: floor and wall patterns, haze, shadows and grain around the objects.

``_render_batch`` runs 2-4 over a batch, in chunks that reuse scratch buffers.

Performance notes (torch CPU): torch.where / masked_fill on pixel-sized tensors and bool ->
float casts are ~30x slower than arithmetic, and every fresh pixel-sized buffer costs page
faults. So the pixel stages combine float 0/1 masks (bool.view(uint8).float() is fast) in
place, in chunks of ``_PIX_CHUNK`` samples that stay in cache.

Every function that renders takes ``world``, the :class:`~dinolab.data.ShapesWorld` whose
settings it reads: ``size``, ``n_objects``, ``object_scale``, ``chunk_size``, ``_palette`` and
the allowed ids ``_class_ids``, ``_tex_ids``, ``_floor_ids``, ``_wall_ids``.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

_MAX_OBJECTS = 16  # object slots per scene: fixes the layout of the random streams below
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}  # stored in the top two bits of a sample key

# ----------------------------------------------------------------------------------------
# Integer hashing: the only source of randomness.
# Plain int64 tensor ops keep 32-bit values in range: every product is split so that it
# stays below 2**63, because signed overflow is not something to rely on.
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow (works on ints and tensors)."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _hash32(x):
    """The "lowbias32" integer hash: a bijection of [0, 2**32) (xorshifts and odd multiplies)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


# Stream ids: random number j of a sample is hash(key ^ _STREAM[j]).
_S_SCENE = 0  # 32 scene-level numbers
_S_OBJ = 32  # 32 numbers per object slot
_S_COARSE = 32 + 32 * _MAX_OBJECTS  # noise lattices follow
_G_COARSE, _G_FINE = 4, 24  # lattice cells per image side, whatever the size
_S_FINE = _S_COARSE + (_G_COARSE + 1) ** 2
_S_GRAIN = _S_FINE + (_G_FINE + 1) ** 2  # 4 * size numbers for the grain follow
# Which of the 32 numbers are layout (drawn from the sample key) and which are appearance (drawn
# from the appearance key, see _appearance_keys): scene numbers 0-7 and object numbers 0-4 are layout.
_SCENE_LAYOUT, _OBJECT_LAYOUT = 8, 5


@functools.lru_cache(maxsize=16)
def _streams(start: int, n: int) -> Tensor:
    return _hash32(torch.arange(start, start + n, dtype=torch.int64) + 0x2545F491)


_STREAM = _streams(0, _S_GRAIN)


def _uniform(keys: Tensor, streams: Tensor) -> Tensor:
    """Uniform [0, 1) float32 of shape keys.shape + streams.shape (24 bits, exact in float32)."""
    h = _hash32(keys.reshape(keys.shape + (1,) * streams.ndim) ^ streams)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _sample_keys(split: str, seed: int, indices: Tensor) -> Tensor:
    """Key of each sample: a bijection of (split, index) for a fixed seed (see dinolab.data's doc)."""
    seed_mix = _hash32(_hash32(seed & _M32) ^ _hash32(((seed >> 32) & _M32) ^ 0x68E31DA4))
    low = (indices ^ (seed_mix & 0x3FFFFFFF)) & 0x3FFFFFFF
    return _hash32((_SPLIT_IDS[split] << 30) | low)


def _appearance_keys(keys: Tensor, appearance: Tensor) -> Tensor:
    """The keys appearance is drawn from: ``keys`` itself where ``appearance`` is 0, else a hash of both."""
    return torch.where(appearance == 0, keys, _hash32(keys ^ _hash32((appearance & _M32) ^ 0x5BD1E995)))


# ----------------------------------------------------------------------------------------
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

_FAR = 1e6  # depth given to window pixels off the shape: never wins the z-test
_PIX_CHUNK = 32  # samples per pixel-stage chunk: keeps the working set in cache
_FOCAL = 0.9  # focal length in image heights: image radius = F * radius_m / depth
_GROUP = 32  # object windows rendered together

# _render_objects packs every active object into one row of two tables, so that a group of
# objects is one slice. Columns of the float table:
_F_X, _F_Y, _F_Y_BASE, _F_RADIUS, _F_BULGE, _F_TEX_COS, _F_TEX_SIN, _F_Z_NEAR, _F_Y_WALL = range(9)
_F_EDGE_COS, _F_EDGE_SIN = 9, 14  # + k: edge normal k (k < 5)
_F_COLOR1, _F_COLOR_DIFF = slice(19, 22), slice(22, 25)  # colour 1 (RGB), colour 2 - colour 1
# Columns of the integer table (windows are pixel cells x0, y0, x1, y1, at + 0 .. + 3):
_I_SAMPLE, _I_SLOT, _I_CLASS, _I_TEXTURE, _I_NOISE_ROW, _I_NOISE_COL = range(6)  # noise: a patch offset
_I_OBJECT_WINDOW, _I_SHADOW_WINDOW = 6, 10


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(...) HSV in [0, 1] -> (..., 3) RGB, branch-free."""
    k = torch.stack([(n + h * 6.0) % 6.0 for n in (5.0, 3.0, 1.0)], dim=-1)
    ramp = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[..., None] - (v * s)[..., None] * ramp


def _lerp_range(rng: tuple[float, float], u: Tensor) -> Tensor:
    return rng[0] + (rng[1] - rng[0]) * u


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


# ----------------------------------------------------------------------------------------
# The pipeline.


def _render_batch(world: Any, keys: Tensor, layers: bool, app_keys: Tensor | None = None) -> dict[str, Tensor]:
    """Render samples ``keys`` (appearance drawn from ``app_keys``, default ``keys``) into
    stacked output tensors (see ``ShapesWorld.batch``), ``world.chunk_size`` samples at a time."""
    app_keys = keys if app_keys is None else app_keys
    B, S, N = len(keys), world.size, world.n_objects[1]
    out = {
        "image": torch.empty(B, 3, S, S),
        "mask": torch.empty(B, S, S, dtype=torch.int64),
        "depth": torch.empty(B, S, S),
        "label": torch.empty(B, dtype=torch.int64),
        "boxes": torch.empty(B, N, 4),
        "box_labels": torch.empty(B, N, dtype=torch.int64),
    }
    # Pixel-sized scratch buffers, reused by every chunk: fresh ones cost page faults.
    C = max(1, min(B, world.chunk_size))
    scratch = {k: torch.empty(C, S, S) for k in ("region", "shadow", "noise")}
    scratch["obj_rgb"] = torch.empty(3, C, S, S)  # channel-major: one flat index per channel
    extras = []
    for c0 in range(0, B, world.chunk_size):
        chunk = slice(c0, min(B, c0 + world.chunk_size))
        extras.append(_render(world, keys[chunk], {k: v[chunk] for k, v in out.items()}, scratch, layers,
                              app_keys[chunk]))
    if layers:
        out.update({k: torch.cat([e[k] for e in extras]) for k in extras[0]} if extras else {})
    return out


def _render(world: Any, keys: Tensor, out: dict[str, Tensor], scratch: dict[str, Tensor], layers: bool,
            app_keys: Tensor) -> dict[str, Tensor]:
    """Render samples ``keys`` (appearance drawn from ``app_keys``) into the sliced outputs ``out``."""
    B, S, N = keys.shape[0], world.size, world.n_objects[1]
    scene = _scene(world, keys, app_keys)
    scratch = {k: v[:, :B] if k == "obj_rgb" else v[:B] for k, v in scratch.items()}
    noise = scratch["noise"]  # texture noise, shared by floor, wall and "noise" objects
    for c0 in range(0, B, _PIX_CHUNK):
        noise[c0 : c0 + _PIX_CHUNK] = _noise(app_keys[c0 : c0 + _PIX_CHUNK], S)
    canvas = _render_objects(world, scene, out["depth"], out["mask"], scratch, layers)
    for c0 in range(0, B, _PIX_CHUNK):
        chunk = slice(c0, min(B, c0 + _PIX_CHUNK))
        _compose(world, scene, canvas, app_keys, chunk, out["image"][chunk])

    cls, area = scene["cls"], canvas["area"]
    visible = area > 0
    class_area = torch.zeros(B, _NUM_CLASSES, dtype=torch.int64).scatter_add_(1, cls, area)
    out["label"][:] = torch.where(class_area[:, 1:].amax(1) > 0, class_area[:, 1:].argmax(1) + 1, 0)
    # Visible boxes first, keeping their far-to-near order.
    front = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices
    boxes = torch.where(visible[..., None], canvas["boxes"], 0.0)
    out["boxes"][:] = torch.gather(boxes, 1, front[..., None].expand(B, N, 4))
    out["box_labels"][:] = torch.gather(torch.where(visible, cls, 0), 1, front)
    if not layers:
        return {}
    return {
        "instance": torch.clamp(canvas["region"].long() - 1, min=0),
        "background_depth": scene["bg_z"].expand(B, S, S).contiguous(),
        "object_depth": canvas["obj_depth"].view(B, N, S, S),
        "object_class": cls,
    }


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
