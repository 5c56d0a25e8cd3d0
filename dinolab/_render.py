"""The ShapesWorld renderer (private: the public dataset is :class:`dinolab.data.ShapesWorld`).

What a scene is and what labels mean is in :mod:`dinolab.data`; depth, determinism and speed here.

What depth means
    ``depth`` is the z-distance from the camera in metres. At row ``y`` (0 = top,
    1 = bottom, in image heights) the floor lies at ``hf / (y - y_horizon)``, so it grows
    smoothly from about 1-1.5 m at the bottom edge toward the horizon until it meets the wall
    (7-10 m), which stays at that constant depth. An object standing at base row ``y_b`` is
    at the floor depth of that row, minus a small dome bulge (at most half its radius). All
    its pixels lie on or above its base row, where the floor is farther away, so an object
    is always nearer than the background behind it. Objects are z-buffered, which gives the
    same result as painting them far-to-near: the nearest surface wins in the image, the
    mask and the depth map alike.

Determinism and splits
    Every random number is an integer hash of a 32-bit sample key, computed in torch with no
    global RNG. The key is a bijection of ``(split, index)`` for a given seed, with the split
    stored in the top two bits, so two samples (of the same or different splits) can never
    share a key, and splits never overlap. ``size`` only sets the sampling resolution: the
    same ``(split, seed, index)`` is the same scene at 64 px or at 256 px. That is useful for
    high-resolution features and Gram anchoring. ``domain`` (palette and texture sets) only
    changes appearance, never layout. So ``ShapesWorld(domain="shifted")[i]`` has the
    same objects in the same places as the source ``ds[i]``, and any accuracy drop on it
    comes from appearance alone.

Speed
    ``batch`` renders many samples at once. Per-object work happens only inside each object's
    bounding window, and windows of the same class and similar size are batched across
    samples, so the Python loops run over those groups (tens per 256 images), never over
    pixels or samples. The per-pixel stages run in place on cache-sized chunks. With the
    default arguments (128 px, 1-4 objects) ``tests/benchmarks/data_speed.py`` measured
    about 1,500 images/s on one thread (torch 2.13 CPU, AMD EPYC, on a shared 2-core VM
    under load, so expect more on an idle core). ``ds[i]`` one at a time manages ~170/s:
    that is per-call overhead, so use ``batch``, ``tensors`` or a DataLoader with a
    batch size (it fetches through the vectorised ``__getitems__``).

This file and four private parts are how it is done:

1. keys (``_render_keys.py``): ``_sample_keys`` turns (split, seed, index) into a 32-bit key,
   ``_uniform`` hashes a key into as many uniform numbers as needed (no global RNG anywhere);
2. ``_scene`` (``_render_scene.py``): every random choice of a scene (camera, room, objects,
   colours, textures) as small per-sample and per-object tensors;
3. ``_render_objects`` (``_render_objects.py``): z-buffer the objects into the depth map, the
   mask and an object-colour canvas, each object only inside its own window;
4. ``_compose`` (``_render_textures.py``): floor and wall patterns, haze, shadows and grain
   around the objects.

``_render_batch`` (here) runs 2-4 over a batch, in chunks that reuse scratch buffers; this file
is also the renderer's interface to :mod:`dinolab.data`.

Performance notes (torch CPU): torch.where / masked_fill on pixel-sized tensors and bool ->
float casts are ~30x slower than arithmetic, and every fresh pixel-sized buffer costs page
faults. So the pixel stages combine float 0/1 masks (bool.view(uint8).float() is fast) in
place, in chunks of ``_PIX_CHUNK`` samples that stay in cache.

Every function that renders takes ``world``, the :class:`~dinolab.data.ShapesWorld` whose
settings it reads: ``size``, ``n_objects``, ``object_scale``, ``chunk_size``, ``_palette`` and
the allowed ids ``_class_ids``, ``_tex_ids``, ``_floor_ids``, ``_wall_ids``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._render_keys import _MAX_OBJECTS, _appearance_keys, _sample_keys  # noqa: F401 (dinolab.data's interface)
from ._render_objects import _render_objects
from ._render_scene import (  # noqa: F401 (the texture ids are re-exported: tests check them against dinolab.data)
    _CHECKER,
    _DOTS,
    _FLAT,
    _FLOOR_NOISE,
    _GRADIENT,
    _NOISE,
    _NUM_CLASSES,
    _PLANKS,
    _STRIPES,
    _TILES,
    _WALL_NOISE,
    _WALL_STRIPES,
    _scene,
)
from ._render_textures import _compose, _noise

_PIX_CHUNK = 32  # samples per pixel-stage chunk: keeps the working set in cache


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
