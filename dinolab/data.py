"""ShapesWorld: a procedural scene dataset that every notebook trains on.

Why procedural
    Nothing is downloaded, every sample is a pure function of ``(split, seed, index)``, and
    every pixel comes with exact labels: a semantic mask, a metric depth map and boxes. That
    is enough to exercise the whole DINOv3 stack (self-distillation, dense features,
    linear-probe segmentation and depth, detection, domain shift) in minutes on a CPU.

What a scene is
    A pinhole camera looks at a floor (the lower part of the image) that meets a far
    fronto-parallel wall (the upper part). Objects (circle, square, triangle, star, ring) are
    flat, upright, slightly domed cut-outs standing on the floor, so their image size and
    height in the image follow from their distance, as in a real photo. Objects and
    backgrounds get random colours and textures; the floor is tiled in perspective and fades
    into haze toward the wall, and each object casts a contact shadow.

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

What ``label`` means
    The image-level class is the one that covers the most visible pixels in ``mask``
    (summed over all objects of that class). Ties go to the smaller class id. It is 0
    (background) only when no object is visible at all.

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
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "CLASS_NAMES",
    "SHAPES",
    "NUM_CLASSES",
    "MASK_COLORS",
    "TEXTURES",
    "FLOOR_TEXTURES",
    "WALL_TEXTURES",
    "SPLITS",
    "Palette",
    "PALETTES",
    "DOMAINS",
    "ShapesWorld",
    "load_split",
]

CLASS_NAMES: tuple[str, ...] = ("background", "circle", "square", "triangle", "star", "ring")
SHAPES: tuple[str, ...] = CLASS_NAMES[1:]
NUM_CLASSES = len(CLASS_NAMES)  # including background
# Colours to draw masks with, one row per class id (row 0 = background).
MASK_COLORS = torch.tensor(
    [
        [0.10, 0.10, 0.10],  # background
        [0.89, 0.10, 0.11],  # circle
        [0.22, 0.49, 0.72],  # square
        [0.30, 0.69, 0.29],  # triangle
        [1.00, 0.85, 0.10],  # star
        [0.60, 0.31, 0.64],  # ring
    ],
    dtype=torch.float32,
)

TEXTURES: tuple[str, ...] = ("flat", "stripes", "checker", "dots", "noise")
FLOOR_TEXTURES: tuple[str, ...] = ("tiles", "planks", "noise")
WALL_TEXTURES: tuple[str, ...] = ("gradient", "stripes", "noise")
SPLITS: tuple[str, ...] = ("train", "val", "test")
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}
_DEFAULT_NUM_SAMPLES = {"train": 8192, "val": 1024, "test": 1024}
_MAX_OBJECTS = 16


@dataclass(frozen=True)
class Palette:
    """HSV ranges (each a ``(lo, hi)`` pair in [0, 1]) that the colours are drawn from.

    A hue range may go past 1 (it wraps around), e.g. ``(0.9, 1.1)`` is "reds".
    """

    object_hue: tuple[float, float] = (0.0, 1.0)
    object_sat: tuple[float, float] = (0.55, 1.0)
    object_val: tuple[float, float] = (0.55, 1.0)
    background_hue: tuple[float, float] = (0.0, 1.0)
    floor_sat: tuple[float, float] = (0.10, 0.45)
    floor_val: tuple[float, float] = (0.35, 0.75)
    wall_sat: tuple[float, float] = (0.05, 0.35)
    wall_val: tuple[float, float] = (0.55, 0.95)


PALETTES: dict[str, Palette] = {
    "vivid": Palette(),
    # Washed-out colours on a bright background: low saturation, high value.
    "pastel": Palette(
        object_sat=(0.15, 0.40), object_val=(0.85, 1.0),
        floor_sat=(0.05, 0.20), floor_val=(0.70, 0.90), wall_sat=(0.0, 0.15), wall_val=(0.80, 1.0),
    ),
    # Low light, warm/purple hues only: a strong shift in every colour statistic.
    "dusk": Palette(
        object_hue=(0.70, 1.12), object_sat=(0.45, 0.9), object_val=(0.35, 0.70),
        background_hue=(0.55, 0.80), floor_sat=(0.20, 0.50), floor_val=(0.15, 0.35),
        wall_sat=(0.30, 0.60), wall_val=(0.15, 0.40),
    ),
    "gray": Palette(object_sat=(0.0, 0.0), floor_sat=(0.0, 0.0), wall_sat=(0.0, 0.0)),
}

# A domain is a named bundle of appearance settings. "shifted" is the target domain of the
# LoRA / domain-adaptation notebook: darker warm colours and textures the source never shows.
DOMAINS: dict[str, dict[str, Any]] = {
    "source": dict(
        palette="vivid",
        textures=("flat", "stripes", "checker", "noise"),
        floor_textures=("tiles", "planks"),
        wall_textures=("gradient", "stripes"),
    ),
    "shifted": dict(
        palette="dusk",
        textures=("dots", "noise"),
        floor_textures=("noise",),
        wall_textures=("noise",),
    ),
}

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


@functools.lru_cache(maxsize=16)
def _streams(start: int, n: int) -> Tensor:
    return _hash32(torch.arange(start, start + n, dtype=torch.int64) + 0x2545F491)


_STREAM = _streams(0, _S_GRAIN)


def _uniform(keys: Tensor, streams: Tensor) -> Tensor:
    """Uniform [0, 1) float32 of shape keys.shape + streams.shape (24 bits, exact in float32)."""
    h = _hash32(keys.reshape(keys.shape + (1,) * streams.ndim) ^ streams)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _sample_keys(split: str, seed: int, indices: Tensor) -> Tensor:
    """Key of each sample: a bijection of (split, index) for a fixed seed (see module doc)."""
    seed_mix = _hash32(_hash32(seed & _M32) ^ _hash32(((seed >> 32) & _M32) ^ 0x68E31DA4))
    low = (indices ^ (seed_mix & 0x3FFFFFFF)) & 0x3FFFFFFF
    return _hash32((_SPLIT_IDS[split] << 30) | low)


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
# Per class id: number of edge normals, angle step between them, offset of the first normal
# from the object's angle, edge distance h, allowed violations, r_in, r_out (circle and
# ring), number of vertices, vertex angle offset and radius (to find the lowest point).
_SHAPE = {
    1: dict(nn=0, step=0, off=0, h=_INF, allow=0, r_in=0.0, r_out=0.97, nv=0, voff=0, vr=0.97),
    2: dict(nn=4, step=300, off=0, h=_SQ * math.sqrt(0.5), allow=0, r_in=0.0, r_out=1.0, nv=4, voff=150, vr=_SQ),
    3: dict(nn=3, step=400, off=200, h=0.5, allow=0, r_in=0.0, r_out=1.0, nv=3, voff=0, vr=1.0),
    4: dict(nn=5, step=240, off=0, h=math.cos(2 * math.pi / 5), allow=1, r_in=0.0, r_out=1.0, nv=5, voff=0, vr=1.0),
    5: dict(nn=0, step=0, off=0, h=_INF, allow=0, r_in=0.55, r_out=1.0, nv=0, voff=0, vr=1.0),
}


def _shape_table(key: str, dtype=torch.float32) -> Tensor:
    return torch.tensor([0] + [_SHAPE[c][key] for c in range(1, NUM_CLASSES)], dtype=dtype)


_T_STEP = _shape_table("step", torch.int64)
_T_OFF = _shape_table("off", torch.int64)
_T_NV = _shape_table("nv", torch.int64)
_T_VOFF = _shape_table("voff", torch.int64)
_T_VR = _shape_table("vr")

_FAR = 1e6  # depth given to window pixels off the shape: never wins the z-test
_PIX_CHUNK = 32  # samples per pixel-stage chunk: keeps the working set in cache
_FOCAL = 0.9  # focal length in image heights: image radius = F * radius_m / depth


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


def _index_tensor(indices: Iterable[int] | Tensor) -> Tensor:
    if isinstance(indices, Tensor):
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"indices must be integers, got a {indices.dtype} tensor")
        return indices.reshape(-1).to(torch.int64)
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) and not hasattr(i, "__index__"):
            raise TypeError(f"indices must be integers, got {i!r}")
        out.append(int(i))
    return torch.tensor(out, dtype=torch.int64)


def _check_choice(name: str, what: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} must not be empty (choose from {allowed})")
    for v in values:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r} in {name}: choose from {allowed}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} has duplicates: {values}")
    return values


class ShapesWorld(torch.utils.data.Dataset):
    """Procedural scenes with images, semantic masks, metric depth, image labels and boxes.

    Args:
        split: "train", "val" or "test". The splits never share a scene.
        size: image side in pixels (any int >= 32). The scene itself does not depend on it.
        n_objects: (min, max) objects per scene, 0 <= min <= max <= 16.
        num_samples: ``len(ds)``. Defaults to 8192 for train and 1024 for val/test.
        object_scale: multiplies every object's size in metres (a float in [0.25, 4]). 1.0, the
            default, gives the scenes of the module doc; larger values make the shapes easier to
            tell apart (the pretraining pilots in data/README.md use 2 and 3). Layout and appearance draws
            are unchanged.
        classes: which shapes may appear. Class ids stay the global ones of ``CLASS_NAMES``
            (a "star"-only dataset still labels stars 4), so models transfer between subsets.
        seed: any int >= 0. Changes every scene.
        domain: "source" or "shifted" (see ``DOMAINS``): a bundle of the four settings below.
            Arguments given explicitly override the domain's.
        palette: a name in ``PALETTES`` or a ``Palette``.
        textures: object textures, a subset of ``TEXTURES``.
        floor_textures / wall_textures: subsets of ``FLOOR_TEXTURES`` / ``WALL_TEXTURES``.
        chunk_size: samples rendered together by ``batch`` (the pixel stages then work through
            them 32 at a time, to stay in cache). Larger chunks pack object windows better but
            need ~0.4 MB of scratch memory per sample at 128 px. Results never depend on it.
        threads: torch intra-op threads while rendering (restored afterwards); None leaves
            torch's setting alone. Rendering is many small ops, which extra threads barely
            speed up and, on a busy machine, slow down many times over (each op waits for a
            descheduled thread), so the default is 1. DataLoader workers also run with 1.

    ``ds[i]`` is a dict (all CPU tensors):
        image (3, S, S) float32 in [0, 1], mask (S, S) int64 in [0, 5], depth (S, S) float32 in
        metres, label () int64 (the class covering most pixels, see the module doc), boxes
        (n, 4) float32 (x0, y0, x1, y1) in pixel edges, so pixel columns x0 <= x < x1 and rows
        y0 <= y < y1, ordered far to near, one per visible object, and box_labels (n,) int64.
    ``ds.batch(indices)`` gives the same values stacked, with boxes padded to
    ``n_objects[1]`` rows (padding rows are zero and their ``box_labels`` are 0).
    To use it with a DataLoader, pass ``collate_fn=ShapesWorld.collate``, because the
    number of boxes varies. Batched fetching (``__getitems__``) is vectorised.
    """

    _GROUP = 32  # object windows rendered together

    def __init__(
        self,
        split: str = "train",
        size: int = 128,
        n_objects: tuple[int, int] = (1, 4),
        num_samples: int | None = None,
        object_scale: float = 1.0,
        classes: Sequence[str] = SHAPES,
        seed: int = 0,
        domain: str = "source",
        palette: str | Palette | None = None,
        textures: Sequence[str] | None = None,
        floor_textures: Sequence[str] | None = None,
        wall_textures: Sequence[str] | None = None,
        chunk_size: int = 256,
        threads: int | None = 1,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}: choose from {SPLITS}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ValueError(f"size must be an int >= 32, got {size!r}")
        try:
            lo, hi = (int(n) for n in n_objects)
        except (TypeError, ValueError):
            raise ValueError(f"n_objects must be a (min, max) pair of ints, got {n_objects!r}") from None
        if not 0 <= lo <= hi <= _MAX_OBJECTS:
            raise ValueError(f"n_objects must satisfy 0 <= min <= max <= {_MAX_OBJECTS}, got {n_objects!r}")
        if isinstance(object_scale, bool) or not isinstance(object_scale, (int, float)) or not (
                0.25 <= object_scale <= 4.0):
            raise ValueError(f"object_scale must be a number in [0.25, 4], got {object_scale!r}")
        if num_samples is None:
            num_samples = _DEFAULT_NUM_SAMPLES[split]
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or not 0 < num_samples <= 1 << 30:
            raise ValueError(f"num_samples must be an int in [1, 2**30], got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}: choose from {tuple(DOMAINS)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        d = DOMAINS[domain]
        palette = d["palette"] if palette is None else palette
        if isinstance(palette, str):
            if palette not in PALETTES:
                raise ValueError(f"unknown palette {palette!r}: choose from {tuple(PALETTES)}")
            palette_obj = PALETTES[palette]
        elif isinstance(palette, Palette):
            palette_obj = palette
        else:
            raise ValueError(f"palette must be a name in PALETTES or a Palette, got {palette!r}")

        self.split = split
        self.size = size
        self.n_objects = (lo, hi)
        self.num_samples = num_samples
        self.object_scale = float(object_scale)
        self.classes = _check_choice("classes", "class", classes, SHAPES)
        self.seed = seed
        self.domain = domain
        self.palette = palette
        own = lambda given, key: d[key] if given is None else given  # noqa: E731 - the domain's by default
        self.textures = _check_choice("textures", "texture", own(textures, "textures"), TEXTURES)
        self.floor_textures = _check_choice(
            "floor_textures", "floor texture", own(floor_textures, "floor_textures"), FLOOR_TEXTURES
        )
        self.wall_textures = _check_choice(
            "wall_textures", "wall texture", own(wall_textures, "wall_textures"), WALL_TEXTURES
        )
        self.chunk_size = chunk_size
        self.threads = threads
        self._palette = palette_obj
        self._class_ids = torch.tensor([CLASS_NAMES.index(c) for c in self.classes], dtype=torch.int64)
        self._tex_ids = torch.tensor([TEXTURES.index(t) for t in self.textures], dtype=torch.int64)
        self._floor_ids = torch.tensor([FLOOR_TEXTURES.index(t) for t in self.floor_textures], dtype=torch.int64)
        self._wall_ids = torch.tensor([WALL_TEXTURES.index(t) for t in self.wall_textures], dtype=torch.int64)

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(split={self.split!r}, size={self.size}, n_objects={self.n_objects}, "
            f"object_scale={self.object_scale}, "
            f"num_samples={self.num_samples}, classes={self.classes}, seed={self.seed}, "
            f"domain={self.domain!r}, palette={self.palette!r}, textures={self.textures})"
        )

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"index must be an int, got {index!r}")
        return self._unbatch(self.batch([int(index)]), 0)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Tensor]]:
        # The DataLoader calls this with a whole batch of indices: render them together.
        out = self.batch(indices)
        return [self._unbatch(out, b) for b in range(len(indices))]

    @staticmethod
    def _unbatch(out: dict[str, Tensor], b: int) -> dict[str, Tensor]:
        keep = out["box_labels"][b] > 0
        return {
            "image": out["image"][b],
            "mask": out["mask"][b],
            "depth": out["depth"][b],
            "label": out["label"][b],
            "boxes": out["boxes"][b][keep],
            "box_labels": out["box_labels"][b][keep],
        }

    @staticmethod
    def collate(samples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stack per-sample dicts like ``batch`` does, padding boxes with zero rows (label 0)."""
        n = max([len(s["box_labels"]) for s in samples] + [0])
        boxes = torch.zeros(len(samples), n, 4)
        box_labels = torch.zeros(len(samples), n, dtype=torch.int64)
        for b, s in enumerate(samples):
            k = len(s["box_labels"])
            boxes[b, :k] = s["boxes"]
            box_labels[b, :k] = s["box_labels"]
        return {
            **{k: torch.stack([s[k] for s in samples]) for k in ("image", "mask", "depth", "label")},
            "boxes": boxes,
            "box_labels": box_labels,
        }

    # ------------------------------------------------------------------ public helpers
    def shifted(self, **overrides: Any) -> "ShapesWorld":
        """The same dataset (split, size, seed, ...) in the "shifted" domain; kwargs override."""
        kw = dict(
            split=self.split, size=self.size, n_objects=self.n_objects, num_samples=self.num_samples,
            object_scale=self.object_scale, classes=self.classes, seed=self.seed, domain="shifted",
            chunk_size=self.chunk_size, threads=self.threads,
        )
        kw.update(overrides)
        return ShapesWorld(**kw)

    def tensors(self, n: int | None = None, start: int = 0) -> dict[str, Tensor]:
        """Samples ``start .. start+n-1`` (default: all) stacked, as returned by ``batch``."""
        n = len(self) - start if n is None else n
        if n < 0 or start < 0 or start + n > len(self):
            raise IndexError(f"range [{start}, {start + n}) is outside the dataset (len {len(self)})")
        return self.batch(torch.arange(start, start + n))

    def batch(self, indices: Iterable[int] | Tensor, layers: bool = False,
              appearance: int | Tensor = 0) -> dict[str, Tensor]:
        """Render the given indices into stacked tensors (see the class docstring).

        ``appearance`` (an int >= 0, or one per index): 0 renders each scene as it is; any other
        value re-draws everything that is only appearance (object and background colours, textures,
        texture noise, grain) from that number, and keeps the layout (camera, objects, classes,
        positions, sizes, so the mask, depth, label and boxes) exactly. Two renders of one scene with
        different ``appearance`` share their shapes and nothing of their colours: the pretraining
        views of notebook 05.

        ``layers=True`` also returns the render's intermediate layers, for tests and figures:
        ``instance`` (B, S, S) int64 (0 = background, j + 1 = object slot j, slots are sorted
        far to near), ``background_depth`` (B, S, S), ``object_depth`` (B, N, S, S) (+inf
        outside object j) and ``object_class`` (B, N) (0 for unused slots).
        """
        keys = self._keys(indices)
        app = torch.as_tensor(appearance)
        if (app.is_floating_point() or app.dtype == torch.bool or app.ndim > 1 or (app.ndim == 1 and len(app) != len(keys))
                or (app < 0).any()):
            raise ValueError(f"appearance must be an int >= 0 or one int >= 0 per index ({len(keys)}), got {appearance!r}")
        app = app.to(torch.int64)
        app_keys = torch.where(app == 0, keys, _hash32(keys ^ _hash32((app & _M32) ^ 0x5BD1E995)))
        prev = torch.get_num_threads()
        if self.threads is not None and self.threads != prev:
            torch.set_num_threads(self.threads)
        try:
            return self._batch(keys, layers, app_keys.expand_as(keys))
        finally:
            if torch.get_num_threads() != prev:
                torch.set_num_threads(prev)

    def _keys(self, indices: Iterable[int] | Tensor) -> Tensor:
        """Sample keys of ``indices``, after checking that every index is in range."""
        idx = _index_tensor(indices)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_samples):
            bad = idx[(idx < 0) | (idx >= self.num_samples)][0].item()
            raise IndexError(f"index {bad} is out of range for {self.split!r} split of length {self.num_samples}")
        return _sample_keys(self.split, self.seed, idx)

    def scene_attributes(self, indices: Iterable[int] | Tensor) -> dict[str, Tensor]:
        """The nuisance factors of samples ``indices``: what a scene has besides its shapes.

        Cheap (no pixels are rendered). Each value has one entry per sample:
        ``n_objects`` (int64, objects placed, visible or not), ``floor_texture`` and
        ``wall_texture`` (int64 indices into ``FLOOR_TEXTURES`` / ``WALL_TEXTURES``) and
        ``floor_hue`` (float32 in [0, 1), a fraction of the colour wheel). None of them depends on
        the class label, so a feature that predicts them well but the label badly has learned
        the scene's look, not its shapes (notebook 05).
        """
        p = self._scene(self._keys(indices))
        return {"n_objects": p["active"].sum(1), "floor_texture": p["f_tex"].clone(),
                "wall_texture": p["w_tex"].clone(), "floor_hue": p["floor_hue"].float()}

    def _batch(self, keys: Tensor, layers: bool, app_keys: Tensor | None = None) -> dict[str, Tensor]:
        app_keys = keys if app_keys is None else app_keys
        B, S, N = len(keys), self.size, self.n_objects[1]
        out = {
            "image": torch.empty(B, 3, S, S),
            "mask": torch.empty(B, S, S, dtype=torch.int64),
            "depth": torch.empty(B, S, S),
            "label": torch.empty(B, dtype=torch.int64),
            "boxes": torch.empty(B, N, 4),
            "box_labels": torch.empty(B, N, dtype=torch.int64),
        }
        # Pixel-sized scratch buffers, reused by every chunk: fresh ones cost page faults.
        C = max(1, min(B, self.chunk_size))
        ws = {k: torch.empty(C, S, S) for k in ("region", "shadow", "noise")}
        ws["obj_rgb"] = torch.empty(3, C, S, S)  # channel-major: one flat index per channel
        extras = []
        for c0 in range(0, B, self.chunk_size):
            sl = slice(c0, min(B, c0 + self.chunk_size))
            extras.append(self._render(keys[sl], {k: v[sl] for k, v in out.items()}, ws, layers, app_keys[sl]))
        if layers:
            out.update({k: torch.cat([e[k] for e in extras]) for k in extras[0]} if extras else {})
        return out

    # ------------------------------------------------------------------ rendering
    # Performance notes (torch CPU): torch.where / masked_fill on pixel-sized tensors and
    # bool -> float casts are ~30x slower than arithmetic, and every fresh pixel-sized buffer
    # costs page faults. So the pixel stages combine float 0/1 masks (bool.view(uint8).float()
    # is fast) in place, in chunks of _PIX_CHUNK samples that stay in cache.
    def _render(self, keys: Tensor, out: dict[str, Tensor], ws: dict[str, Tensor], layers: bool,
                app_keys: Tensor) -> dict[str, Tensor]:
        """Render samples ``keys`` (appearance drawn from ``app_keys``) into the sliced outputs ``out``."""
        B, S, N = keys.shape[0], self.size, self.n_objects[1]
        p = self._scene(keys, app_keys)
        ws = {k: v[:, :B] if k == "obj_rgb" else v[:B] for k, v in ws.items()}
        noise = ws["noise"]  # texture noise, shared by floor, wall and "noise" objects
        for c0 in range(0, B, _PIX_CHUNK):
            noise[c0 : c0 + _PIX_CHUNK] = _noise(app_keys[c0 : c0 + _PIX_CHUNK], S)
        cv = self._render_objects(p, out["depth"], out["mask"], ws, layers)
        for c0 in range(0, B, _PIX_CHUNK):
            sl = slice(c0, min(B, c0 + _PIX_CHUNK))
            self._compose(p, cv, app_keys, sl, out["image"][sl])

        cls, area = p["cls"], cv["area"]
        visible = area > 0
        class_area = torch.zeros(B, NUM_CLASSES, dtype=torch.int64).scatter_add_(1, cls, area)
        out["label"][:] = torch.where(class_area[:, 1:].amax(1) > 0, class_area[:, 1:].argmax(1) + 1, 0)
        # Visible boxes first, keeping their far-to-near order.
        front = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices
        boxes = torch.where(visible[..., None], cv["boxes"], 0.0)
        out["boxes"][:] = torch.gather(boxes, 1, front[..., None].expand(B, N, 4))
        out["box_labels"][:] = torch.gather(torch.where(visible, cls, 0), 1, front)
        if not layers:
            return {}
        return {
            "instance": torch.clamp(cv["region"].long() - 1, min=0),
            "background_depth": p["bg_z"].expand(B, S, S).contiguous(),
            "object_depth": cv["obj_depth"].view(B, N, S, S),
            "object_class": cls,
        }

    def _scene(self, keys: Tensor, app_keys: Tensor | None = None) -> dict[str, Tensor]:
        """Every random choice of the scenes, as small per-sample / per-object tensors.

        Layout numbers (``su[:, :8]``, ``ou[..., :5]``) come from ``keys``; appearance numbers
        (``su[:, 8:]``, ``ou[..., 5:]``) from ``app_keys`` (default: ``keys``)."""
        B, S, N = keys.shape[0], self.size, self.n_objects[1]
        pal = self._palette
        su = _uniform(keys, _STREAM[_S_SCENE : _S_SCENE + 32])  # (B, 32)
        ou = _uniform(keys, _STREAM[_S_OBJ : _S_OBJ + 32 * N].view(N, 32))  # (B, N, 32)
        if app_keys is not None and not torch.equal(app_keys, keys):
            su = torch.cat([su[:, :8], _uniform(app_keys, _STREAM[_S_SCENE + 8 : _S_SCENE + 32])], 1)
            ou_app = _uniform(app_keys, _STREAM[_S_OBJ : _S_OBJ + 32 * N].view(N, 32))
            ou = torch.cat([ou[..., :5], ou_app[..., 5:]], -1)
        def pick(choices: Tensor, u: Tensor) -> Tensor:
            return choices[torch.clamp(torch.floor(u * len(choices)).long(), max=len(choices) - 1)]


        # Camera and room. y_w = row where floor meets wall; solve the floor's
        # depth(y) = hf / (y - y_h) so that it is z_bot at the bottom edge and z_wall at y_w.
        y_w = 0.30 + 0.18 * su[:, 0]
        z_wall = 7.0 + 3.0 * su[:, 1]
        z_bot = 1.0 + 0.5 * su[:, 2]
        y_h = (z_wall * y_w - z_bot) / (z_wall - z_bot)
        hf = z_bot * (1.0 - y_h)
        ys = ((torch.arange(S, dtype=torch.float32) + 0.5) / S).view(1, S, 1)  # pixel-centre rows
        z_floor = hf.view(B, 1, 1) / torch.clamp(ys - y_h.view(B, 1, 1), min=1e-6)  # huge above the horizon
        bg_z = torch.minimum(z_floor, z_wall.view(B, 1, 1))  # (B, S, 1): depends on the row only

        # Objects: one slot per possible object; slots past n_obj are inactive.
        lo, hi = self.n_objects
        n_obj = lo + torch.clamp(torch.floor(su[:, 3] * (hi - lo + 1)).long(), max=hi - lo)
        active = torch.arange(N) < n_obj[:, None]
        cls = pick(self._class_ids, ou[..., 0])
        # Base rows uniform between the farthest allowed depth and the bottom edge
        # (= uniform in inverse depth, as for things lying around on a real floor).
        yb_min = (y_h + hf / (0.55 * z_wall))[:, None]
        y_b = yb_min + (1.0 - yb_min) * ou[..., 1]
        z_obj = hf[:, None] / (y_b - y_h[:, None])
        r_m = (0.18 + 0.18 * ou[..., 2]) * self.object_scale  # radius in metres
        r = torch.clamp(_FOCAL * r_m / z_obj, min=0.025)  # radius in image heights
        x_c = 0.06 + 0.88 * ou[..., 3]
        ang = torch.clamp(torch.floor(ou[..., 4] * _ANGLES).long(), max=_ANGLES - 1)
        bulge = 0.5 * r_m  # dome height in metres: the centre is this much nearer than the rim

        # Edge normals (B, N, 5) and the lowest vertex, to stand each object on its base row.
        k5 = torch.arange(5)
        n_ang = (ang[..., None] + _T_OFF[cls][..., None] + _T_STEP[cls][..., None] * k5) % _ANGLES
        nv = _T_NV[cls]
        v_step = _ANGLES // torch.clamp(nv, min=1)
        v_ang = (ang[..., None] + _T_VOFF[cls][..., None] + v_step[..., None] * k5) % _ANGLES
        v_low = torch.where(k5 < nv[..., None], _SIN[v_ang], torch.full((), -_INF)).amax(-1)
        ext = torch.where(nv > 0, _T_VR[cls] * v_low, _T_VR[cls])  # lowest point below the centre

        # Object textures: a pattern t in [0, 1] blends colour 1 into colour 2.
        tex = pick(self._tex_ids, ou[..., 5])
        freq = 1.2 + 1.8 * ou[..., 6]  # pattern periods per radius
        t_ang = torch.clamp(torch.floor(ou[..., 7] * _ANGLES).long(), max=_ANGLES - 1)
        hsv = lambda u0, u1, u2: _hsv_to_rgb(  # noqa: E731
            _lerp_range(pal.object_hue, u0) % 1.0, _lerp_range(pal.object_sat, u1), _lerp_range(pal.object_val, u2)
        )
        c1 = hsv(ou[..., 8], ou[..., 9], ou[..., 10])
        c2 = hsv(ou[..., 11], ou[..., 12], ou[..., 13])
        # "noise" blends into a darker version of colour 1 rather than into a second hue.
        c2 = torch.where((tex == TEXTURES.index("noise"))[..., None], 0.45 * c1, c2)

        obj = dict(
            active=active, cls=cls, y_b=y_b, z_obj=z_obj, r=r, x_c=x_c, y_c=y_b - r * ext, bulge=bulge,
            n_cos=_COS[n_ang], n_sin=_SIN[n_ang], tex=tex, t_cos=_COS[t_ang] * freq, t_sin=_SIN[t_ang] * freq,
            noise_shift=torch.floor(ou[..., 14:16] * S).long(),  # where a "noise" object cuts its noise from
            c1=c1, c2=c2,
        )
        # Far-to-near slot order, inactive slots last: instance ids and boxes come out sorted.
        order = torch.sort(torch.where(active, z_obj, -_INF), dim=1, descending=True, stable=True).indices
        for k, t in obj.items():
            obj[k] = torch.gather(t, 1, order if t.ndim == 2 else order[..., None].expand_as(t))
        obj["cls"] = torch.where(obj["active"], obj["cls"], 0)

        # Background appearance.
        sb = su[:, 8:]
        hue = _lerp_range(pal.background_hue, sb[:, 0]) % 1.0
        fs, fv = _lerp_range(pal.floor_sat, sb[:, 1]), _lerp_range(pal.floor_val, sb[:, 2])
        f1 = _hsv_to_rgb(hue, fs, fv)
        f2 = _hsv_to_rgb((hue + 0.15 * (sb[:, 3] - 0.5)) % 1.0, fs, fv * (0.45 + 0.3 * sb[:, 4]))
        w_hue = (hue + 0.5 * sb[:, 5]) % 1.0  # related to the floor's hue, not equal to it
        ws, wv = _lerp_range(pal.wall_sat, sb[:, 6]), _lerp_range(pal.wall_val, sb[:, 7])
        w1 = _hsv_to_rgb(w_hue, ws, wv)
        w2 = _hsv_to_rgb(w_hue, ws * 0.6, wv * (0.6 + 0.25 * sb[:, 8]))
        f_tex = pick(self._floor_ids, sb[:, 9])
        tile = (0.35 + 0.4 * sb[:, 10]) * torch.where(f_tex == 1, 0.5, 1.0)  # planks: narrower
        return dict(
            obj,
            y_w=y_w, z_wall=z_wall, z_bot=z_bot, z_floor=z_floor, bg_z=bg_z, floor_row=(ys > y_w.view(B, 1, 1)).float(),
            f1=f1, f2=f2, w1=w1, w2=w2, f_tex=f_tex, tile=tile, floor_hue=hue,
            w_tex=pick(self._wall_ids, sb[:, 11]), w_freq=6.0 + 14.0 * sb[:, 12],
        )

    def _render_objects(
        self, p: dict[str, Tensor], zbuf: Tensor, mask: Tensor, ws: dict[str, Tensor], layers: bool
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
        B, S, N = p["active"].shape[0], self.size, self.n_objects[1]
        col = lambda t: t.reshape(-1, 1, 1)  # noqa: E731 - (G,) -> broadcastable over a window
        zbuf.copy_(p["bg_z"].expand(B, S, S))  # the depth output itself serves as the z-buffer
        region = ws["region"].copy_(p["floor_row"].expand(B, S, S))  # 0 = wall, 1 = floor, 2 + j = object j
        obj_rgb = ws["obj_rgb"].zero_()  # final object colours, 0 off objects
        mask.zero_()
        shadow = ws["shadow"].zero_()
        noise = ws["noise"]
        zflat, rflat = zbuf.view(-1), region.view(-1)

        # One row per active object: gather once up front, not in every group.
        ob, oj = p["active"].nonzero(as_tuple=True)
        fp = torch.cat(
            [
                torch.stack([p[k] for k in ("x_c", "y_c", "y_b", "r", "bulge", "t_cos", "t_sin")], -1),
                (p["z_obj"] - p["bulge"])[..., None],
                p["y_w"][:, None, None].expand(B, N, 1),
                p["n_cos"],
                p["n_sin"],
                p["c1"],
                p["c2"] - p["c1"],
            ],
            -1,
        )[ob, oj]  # (M, 25): 0 x_c, 1 y_c, 2 y_b, 3 r, 4 bulge, 5 t_cos, 6 t_sin, 7 z_near, 8 y_w,
        # 9.. edge cos, 14.. edge sin, 19.. colour 1, 22.. colour 2 - colour 1
        xc, yc, yb, rr = fp[:, 0], fp[:, 1], fp[:, 2], fp[:, 3]
        cell = lambda v, d: torch.clamp(torch.floor(v * S).long() + d, 0, S - 1)  # noqa: E731 - 1 px margin
        o_cls = p["cls"][ob, oj]
        ip = torch.stack(
            [
                ob, oj, o_cls, p["tex"][ob, oj], p["noise_shift"][ob, oj, 0], p["noise_shift"][ob, oj, 1],
                cell(xc - rr, -1), cell(yc - rr, -1), cell(xc + rr, 1), cell(yc + rr, 1),  # 6..9: object window
                # 10..13: shadow window
                cell(xc - 1.3 * rr, -1), cell(yb - 0.3 * rr, -1), cell(xc + 1.3 * rr, 1), cell(yb + 0.3 * rr, 1),
            ],
            1,
        )  # (M, 14)

        def groups(lo: int, by_class: bool):
            """Batches of rows of (fp, ip) with similar window sizes, and their window pixels."""
            wx, wy = ip[:, lo + 2] - ip[:, lo] + 1, ip[:, lo + 3] - ip[:, lo + 1] + 1
            key = wx * wy + (o_cls * (4 * S * S) if by_class else 0)
            srt = torch.argsort(key, stable=True)
            f_all, i_all, wx, wy = fp[srt], ip[srt], wx[srt], wy[srt]
            seg = i_all[:, 2].tolist() if by_class else [0] * len(srt)
            starts = [g for g in range(len(seg)) if g == 0 or seg[g] != seg[g - 1]] + [len(seg)]
            for s, e in zip(starts[:-1], starts[1:]):
                for g0 in range(s, e, self._GROUP):
                    g1 = min(g0 + self._GROUP, e)
                    f, i = f_all[g0:g1], i_all[g0:g1]
                    gx, gy = int(wx[g0:g1].max()), int(wy[g0:g1].max())
                    # Windows that would cross the right/bottom edge move back inside: they
                    # still cover the object's visible part, and every window pixel is real.
                    cols = torch.clamp(i[:, lo], max=S - gx)[:, None] + torch.arange(gx)  # (G, gx)
                    rows = torch.clamp(i[:, lo + 1], max=S - gy)[:, None] + torch.arange(gy)  # (G, gy)
                    pix = (col(i[:, 0] * S * S) + rows[:, :, None] * S + cols[:, None, :]).view(-1)
                    wxs = ((cols.float() + 0.5) / S)[:, None, :]  # the same floats as the full grid
                    wys = ((rows.float() + 0.5) / S)[:, :, None]
                    yield seg[g0], f, i, rows, cols, pix, wxs, wys

        # Contact shadows: soft ellipses on the floor around each base.
        for _, f, _, _, _, pix, wxs, wys in groups(10, by_class=False):
            ex = (wxs - col(f[:, 0])) / col(1.3 * f[:, 3])
            ey = (wys - col(f[:, 2])) / col(0.3 * f[:, 3])
            soft = torch.clamp(1.0 - (ex * ex + ey * ey), min=0.0).mul_((wys > col(f[:, 8])).float())
            shadow.view(-1).scatter_reduce_(0, pix, soft.view(-1), "amax")

        windows = []
        for c, f, i, rows, cols, pix, wxs, wys in groups(6, by_class=True):
            dx = (wxs - col(f[:, 0])) / col(f[:, 3])  # (G, 1, gx), in radii
            dy = (wys - col(f[:, 1])) / col(f[:, 3])  # (G, gy, 1)
            d2 = dx * dx + dy * dy
            shape = _SHAPE[c]
            if shape["nn"] == 0:  # circle, ring
                inside = d2 <= shape["r_out"] ** 2
                if shape["r_in"] > 0:
                    inside &= d2 >= shape["r_in"] ** 2
            else:  # polygons: half-plane tests against the edge lines
                viol = None
                for k in range(shape["nn"]):
                    v = (dx * col(f[:, 9 + k]) + dy * col(f[:, 14 + k])) > shape["h"]
                    if shape["allow"] == 0:
                        viol = v if viol is None else viol.logical_or_(v)
                    else:
                        v = v.view(torch.uint8)
                        viol = v if viol is None else viol.add_(v)
                inside = ~viol if shape["allow"] == 0 else viol <= shape["allow"]
            z_o = torch.clamp(d2, max=1.0).mul_(col(f[:, 4])).add_(col(f[:, 7]))
            z_o.add_((~inside).view(torch.uint8).float(), alpha=_FAR)  # off the shape: never wins
            zflat.scatter_reduce_(0, pix, z_o.view(-1), "amin")

            # Texture pattern in the object's own (rotated, scaled) frame, so it moves with it.
            tx = i[:, 3]
            present = set(tx.tolist())
            t = torch.zeros(z_o.shape) if present - {0} else None  # None: all flat, t = 0
            sel = lambda k: col((tx == k).float())  # noqa: E731
            if present & {1, 2, 3}:
                tc, ts = col(f[:, 5]), col(f[:, 6])
                # frac of a positive number (|u| < 5 here): torch.remainder is ~10x slower
                pu = torch.frac((dx * tc + dy * ts).add_(8.0))
                pv = torch.frac((dy * tc - dx * ts).add_(8.0)) if present & {2, 3} else None
                if present & {1, 2}:
                    half_u = pu < 0.5
                if 1 in present:
                    t += sel(1) * half_u.view(torch.uint8).float()
                if 2 in present:
                    t += sel(2) * (half_u ^ (pv < 0.5)).view(torch.uint8).float()
                if 3 in present:
                    pu, pv = pu - 0.5, pv - 0.5
                    t += sel(3) * (pu.mul_(pu).add_(pv.mul_(pv)) < 0.09).view(torch.uint8).float()
            if 4 in present:
                n_rows, n_cols = (rows + i[:, 4:5]) % S, (cols + i[:, 5:6]) % S  # the object's own patch
                npix = col(i[:, 0] * S * S) + n_rows[:, :, None] * S + n_cols[:, None, :]
                t += sel(4) * noise.view(-1).index_select(0, npix.view(-1)).view(z_o.shape)
            sh = (0.98 - 0.12 * dy) - 0.3 * d2  # dome shading, lit from above: in [0.56, 0.992]
            windows.append((i[:, 0], i[:, 1], i[:, 2], f, pix, rows, cols, z_o, t, sh))

        # Who won each pixel: the nearest surface; among exactly equal depths, the larger slot.
        for b, j, _, _, pix, _, _, z_o, _, _ in windows:
            won = (z_o == zflat.index_select(0, pix).view(z_o.shape)).view(torch.uint8).float()  # never off-shape
            rflat.scatter_reduce_(0, pix, won.mul_(col((j + 2).float())).view(-1), "amax")
        obj_depth = torch.full((B * N * S * S,) if layers else (0,), _INF)
        stats = []
        for b, j, c, f, pix, rows, cols, z_o, t, sh in windows:
            vis = rflat.index_select(0, pix).view(z_o.shape) == col((j + 2).float())  # one object per pixel now
            visf = vis.view(torch.uint8).float()
            # Final colour (colour1 + (colour2 - colour1) * t) * shading; 0 where not visible, so
            # the sum over overlapping windows is exactly the visible object's colour.
            sh = sh.mul_(visf)[:, None]
            if t is None:
                rgb = f[:, 19:22, None, None] * sh
            else:
                rgb = (f[:, 22:25, None, None] * t[:, None]).add_(f[:, 19:22, None, None]).mul_(sh)
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
                plane = pix.view(z_o.shape) + col((b * (N - 1) + j) * S * S)
                obj_depth[plane.view(-1)] = torch.where(z_o < _FAR / 2, z_o, _INF).view(-1)
        area = torch.zeros(B, N, dtype=torch.int64)
        boxes = torch.zeros(B, N, 4)
        if stats:
            sb, sj, sa, sx = (torch.cat(z) for z in zip(*stats))
            area[sb, sj] = sa
            boxes[sb, sj] = sx
        return dict(
            noise=noise, region=region, obj_rgb=obj_rgb, shadow=shadow, area=area, boxes=boxes, obj_depth=obj_depth
        )

    def _compose(self, p: dict[str, Tensor], cv: dict[str, Tensor], keys: Tensor, sl: slice, image: Tensor) -> None:
        """Write the images of samples ``sl``: background colours and textures, then objects.

        Pixel-sized tensors dominate the cost here, so everything that depends on the row only
        (wall or floor, haze) is folded into (B, 3, S, 1) colour terms, and every factor stays
        in [0, 1] by construction, so no final clamp is needed.
        """
        S = self.size
        B = sl.stop - sl.start
        col = lambda t: t[sl].reshape(-1, 1, 1)  # noqa: E731
        xs = ((torch.arange(S, dtype=torch.float32) + 0.5) / S).view(1, 1, S)
        ys = xs.view(1, S, 1)
        z_floor, fr, noise = p["z_floor"][sl], p["floor_row"][sl], cv["noise"][sl]
        sel = lambda ids, k: col((ids == k).float())  # noqa: E731

        # Floor pattern in floor-plane coordinates (metres), so it recedes in perspective:
        # tiles = parity(tile column) XOR parity(tile row); planks = parity(column) alone.
        f_tex, tile = p["f_tex"], p["tile"]
        present = set(f_tex[sl].tolist())
        tf = None
        if present & {0, 1}:
            half_col = (xs - 0.5) * (z_floor / (2.0 * _FOCAL * col(tile)))  # tile column / 2
            odd_col = torch.frac(half_col.add_(1 << 20)) >= 0.5  # shifted positive first
            odd_row = (_parity(torch.floor(z_floor / col(tile))) * sel(f_tex, 0)) > 0.5  # (B, S, 1)
            tf = (odd_col ^ odd_row).view(torch.uint8).float()
            if 2 in present:
                tf.mul_(1.0 - sel(f_tex, 2))
        if 2 in present:
            tf = noise * sel(f_tex, 2) if tf is None else tf.add_(noise * sel(f_tex, 2))

        w_tex = p["w_tex"]
        present = set(w_tex[sl].tolist())
        tw = torch.zeros(())
        if 0 in present:
            tw = tw + sel(w_tex, 0) * torch.clamp(ys / col(p["y_w"]), max=1.0)
        if 1 in present:
            tw = tw + sel(w_tex, 1) * _parity(torch.floor(xs * col(p["w_freq"])))
        if 2 in present:
            tw = tw + sel(w_tex, 2) * noise
        t_bg = (tf * fr).add_(tw * (1.0 - fr))  # (B, S, S)

        # Per-row colours: c1 + (c2 - c1) * t. On the floor, haze pulls t toward 0.5 with the
        # distance: it hides tile aliasing near the horizon and is a depth cue.
        z_bot, z_wall = col(p["z_bot"]), col(p["z_wall"])
        haze = (0.85 * torch.clamp((z_floor - z_bot) / (z_wall - z_bot), 0.0, 1.0))[:, None]  # (B, 1, S, 1)
        f1, f2, w1, w2 = (p[k][sl].view(B, 3, 1, 1) for k in ("f1", "f2", "w1", "w2"))
        frc = fr[:, None]
        c1_row = frc * (f1 + 0.5 * haze * (f2 - f1)) + (1.0 - frc) * w1  # (B, 3, S, 1)
        dc_row = frc * ((f2 - f1) * (1.0 - haze)) + (1.0 - frc) * (w2 - w1)

        # Background light: shadows darken, objects hide it (their own colour is in obj_rgb,
        # 0 elsewhere); grain on everything. In place from here on.
        inv = (cv["region"][sl] < 2.0).view(torch.uint8).float()  # 1 off objects
        bg_light = cv["shadow"][sl].mul(-0.4).add_(1.0).mul_(inv)
        torch.mul(dc_row, t_bg[:, None], out=image)
        image.add_(c1_row).mul_(bg_light[:, None]).add_(cv["obj_rgb"][:, sl].transpose(0, 1))
        image.mul_(_grain(keys[sl], S)[:, None])


def load_split(split: str = "train", n: int | None = None, **kwargs: Any) -> dict[str, Tensor]:
    """``ShapesWorld(split, **kwargs).tensors(n)``: the first n samples as stacked tensors.

    Keys: image (N, 3, S, S), mask (N, S, S), depth (N, S, S), label (N,), boxes (N, M, 4) and
    box_labels (N, M), with M = n_objects[1] and padding rows labelled 0.
    """
    if n is not None and "num_samples" not in kwargs:
        kwargs["num_samples"] = max(n, 1)
    return ShapesWorld(split, **kwargs).tensors(n)
