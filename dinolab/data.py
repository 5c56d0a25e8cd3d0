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

What ``label`` means
    The image-level class is the one that covers the most visible pixels in ``mask``
    (summed over all objects of that class). Ties go to the smaller class id. It is 0
    (background) only when no object is visible at all.

Splits, resolution and domains
    Every sample is a pure function of ``(split, seed, index)``; splits never overlap; ``size`` only sets the
    sampling resolution (the same scene at 64 or 256 px); ``domain`` changes appearance, never layout. Use
    ``batch`` / ``tensors`` (vectorised), not ``ds[i]`` in a loop.

This file is the dataset: its constants, arguments and outputs. The renderer behind it (hashing,
scene layout, z-buffering, textures) is the private ``dinolab/_render.py``, whose docstring explains depth,
determinism and speed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from ._render import _MAX_OBJECTS, _appearance_keys, _render_batch, _sample_keys, _scene

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
_DEFAULT_NUM_SAMPLES = {"train": 8192, "val": 1024, "test": 1024}


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
        if split not in SPLITS:
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
        app_keys = _appearance_keys(keys, app)
        prev = torch.get_num_threads()
        if self.threads is not None and self.threads != prev:
            torch.set_num_threads(self.threads)
        try:
            return _render_batch(self, keys, layers, app_keys.expand_as(keys))
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
        scene = _scene(self, self._keys(indices))
        return {"n_objects": scene["active"].sum(1), "floor_texture": scene["floor_tex"].clone(),
                "wall_texture": scene["wall_tex"].clone(), "floor_hue": scene["floor_hue"].float()}

    def instances(self, indices: Iterable[int] | Tensor) -> dict[str, Tensor]:
        """``batch(indices)`` plus ``instance_masks`` (B, N, S, S) bool: the visible pixels of each object, row k
        aligned with ``boxes[:, k]`` and ``box_labels[:, k]`` (visible objects first, far to near; padding rows
        are empty). For instance segmentation and detection targets (notebooks 14, 15)."""
        out = self.batch(indices, layers=True)
        inst = out.pop("instance")
        for k in ("background_depth", "object_depth", "object_class"):
            out.pop(k)
        N = out["boxes"].shape[1]
        slots = inst[:, None] == torch.arange(1, N + 1)[None, :, None, None]  # (B, N, S, S), slot order
        visible = slots.flatten(2).any(-1)
        front = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices  # as the boxes: visible first
        out["instance_masks"] = torch.gather(slots, 1, front[..., None, None].expand_as(slots))
        return out


def load_split(split: str = "train", n: int | None = None, **kwargs: Any) -> dict[str, Tensor]:
    """``ShapesWorld(split, **kwargs).tensors(n)``: the first n samples as stacked tensors.

    Keys: image (N, 3, S, S), mask (N, S, S), depth (N, S, S), label (N,), boxes (N, M, 4) and
    box_labels (N, M), with M = n_objects[1] and padding rows labelled 0.
    """
    if n is not None and "num_samples" not in kwargs:
        kwargs["num_samples"] = max(n, 1)
    return ShapesWorld(split, **kwargs).tensors(n)
