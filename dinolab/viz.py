"""Figures the notebooks share: the one figure style, the series map, the sample photo, token grids, PCA maps.

Every notebook calls ``viz.use_style()`` in its set-up cell, so all figures are drawn for a projector: PNG at
100 dpi, no text below 10 pt, a colour-blind-safe colour cycle. nbval ignores PNG bytes, so figures never
make CI flaky. The notebooks are committed with their outputs: prefer fewer, better figures to smaller ones.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .utils import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: F401 - re-exported for the notebooks

# Okabe & Ito's colour-blind-safe palette (blue, orange, green, vermillion, purple, sky blue, yellow, black).
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
DPI = 100  # inline PNGs are drawn at figure.dpi (matplotlib_inline); 12.8 x 7.2 in -> a 1280 x 720 slide
MIN_FONT_PT = 10  # no text smaller than this (checked by tools/check_figures.py)
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.figsize": (12.8, 4.8),
    "font.size": 13,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "xtick.labelsize": 12,
    "ytick.labelsize": 12,
    "legend.fontsize": 12,
    "legend.title_fontsize": 12,
    "figure.titlesize": 15,
    "figure.labelsize": 13,
    "lines.linewidth": 2.0,
    "lines.markersize": 6,
    "axes.linewidth": 1.0,
}


def use_style() -> None:
    """Set matplotlib's rcParams for every figure of the series (call once, in the set-up cell).

    Sizes: a figure of ``figsize=(12.8, 7.2)`` fills a 16:9 slide at 1280 x 720 px, ``(12.8, 4.8)`` (the
    default) two thirds of it. Text: 13 pt base, 12 pt ticks and legends; relative sizes such as
    ``fontsize="small"`` stay >= 10 pt. Notebooks do not set rcParams, ``dpi=`` or font sizes below 10."""
    import matplotlib.pyplot as plt  # noqa: F401 - the inline backend is configured on this import
    from cycler import cycler
    from matplotlib import rcParams

    rcParams.update(STYLE)
    rcParams["axes.prop_cycle"] = cycler(color=COLORS)

SERIES = [
    ("00", "dino_v1_v2_v3", "DINO v1 → v2 → v3: what changed"),
    ("01", "patch_embedding", "Patch embedding: images to tokens"),
    ("02", "rope", "2-D rotary position embedding"),
    ("03", "attention_and_blocks", "Attention, LayerScale, SwiGLU, RMSNorm"),
    ("04", "vit_backbone", "The DINOv3 ViT: seven configs, weights, features"),
    ("05", "self_distillation", "Self-distillation: DINO, iBOT, KoLeo, Gram anchoring"),
    ("06", "spatial_prior_module", "The Spatial Prior Module"),
    ("07", "ms_deform_attn", "Multi-scale deformable attention"),
    ("08", "adapter_interaction", "The adapter's interaction blocks"),
    ("09", "pixel_decoder_fpn", "Pixel decoder and FPN"),
    ("10", "segmentation", "Segmentation, end to end"),
    ("11", "depth", "Depth with a DPT head"),
    ("12", "classification", "Classification: linear probe and k-NN"),
    ("13", "lora", "LoRA on q and v"),
    ("14", "mask2former", "Mask2Former's query decoder and EoMT"),
    ("15", "detection", "Detection: DETR-style set prediction"),
]


def series_map(current: str) -> str:
    """Markdown table of the series with notebook ``current`` (e.g. "02") in bold. Use with
    ``IPython.display.Markdown``."""
    rows = ["| # | notebook | topic |", "|---|---|---|"]
    for num, stem, title in SERIES:
        name = f"`{num}_{stem}`"
        if num == current:
            rows.append(f"| **{num}** | **{name}** ← you are here | **{title}** |")
        else:
            rows.append(f"| {num} | {name} | {title} |")
    return "\n".join(rows)


def load_photo(size: int | tuple[int, int] = 224, crop: bool = True) -> Tensor:
    """matplotlib's bundled ``grace_hopper.jpg`` (offline) as a float tensor (3, H, W) in [0, 1].

    ``size`` int: shorter side resized to ``size`` then centre-cropped to size x size (``crop``);
    a tuple (H, W): resized to exactly that."""
    import matplotlib.cbook as cbook
    import numpy as np
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    if isinstance(size, int):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        if crop:
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
    else:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def to_numpy_image(img: Tensor):
    """(3, H, W) tensor -> (H, W, 3) numpy array clipped to [0, 1] for imshow."""
    return img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def draw_patch_grid(ax, img: Tensor, patch: int = 16, color: str = "white", lw: float = 0.5, title: str | None = None):
    """Show ``img`` with the patch grid drawn over it."""
    H, W = img.shape[-2:]
    ax.imshow(to_numpy_image(img), interpolation="nearest")  # the pixels as they are (and a lighter PNG)
    for y in range(0, H + 1, patch):
        ax.axhline(y - 0.5, color=color, lw=lw)
    for x in range(0, W + 1, patch):
        ax.axvline(x - 0.5, color=color, lw=lw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return ax


def pca_rgb(features: Tensor, n_components: int = 3, mask: Tensor | None = None) -> Tensor:
    """Project (..., N, D) features on their first 3 principal components, scaled to [0, 1] per
    component (the usual "PCA map" of DINO features). ``mask`` (N,) bool: fit the PCA on those
    tokens only (e.g. the foreground). Returns (..., N, 3)."""
    x = features.detach().float().reshape(-1, features.shape[-1])
    fit = x[mask.reshape(-1)] if mask is not None else x
    mean = fit.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(fit - mean, full_matrices=False)
    proj = (x - mean) @ v[:n_components].T
    # robust scaling: 2nd–98th percentiles of each component to [0, 1]
    lo = torch.quantile(proj, 0.02, dim=0, keepdim=True)
    hi = torch.quantile(proj, 0.98, dim=0, keepdim=True)
    proj = ((proj - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return proj.reshape(*features.shape[:-1], n_components)
