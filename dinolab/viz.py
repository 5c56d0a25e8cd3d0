"""Figures the notebooks share: the one figure style, the series map, the sample photo, token grids, PCA maps,
box-and-arrow diagrams (``diagram_canvas``, ``diagram_box``, ``diagram_arrow``).

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


# ---------------------------------------------------------------------------------------------------------------
# Box-and-arrow diagrams (the SPM in 06, MSDeformAttn in 07, the pixel decoder in 09, the DPT head in 11)
# ---------------------------------------------------------------------------------------------------------------

# Fills of the boxes: inputs / outputs grey, learnt layers blue, reshapes and sums orange, attention or fusion green.
DIAGRAM_FILLS = {"io": "#e6e6e6", "blue": "#cde2f2", "orange": "#fbe6c6", "green": "#cdeedf", "white": "white"}


def diagram_canvas(width: float = 128, height: float = 72):
    """A figure that fills a 16:9 slide with one axes in diagram units: x in [0, ``width``], y in [0, ``height``]
    (the default 128 x 72 is 10 units per inch of the 12.8 x 7.2 in figure). Returns (fig, ax)."""
    import matplotlib.pyplot as plt

    if width <= 0 or height <= 0:
        raise ValueError(f"diagram_canvas needs a positive width and height, got {width} x {height}")
    fig = plt.figure(figsize=(12.8, 12.8 * height / width))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, width), ylim=(0, height))
    ax.axis("off")
    return fig, ax


def diagram_box(ax, x: float, y: float, w: float, h: float, text: str, fill: str = "io", *, fontsize: float = 12,
                dashed: bool = False, rounding: float = 1.0) -> dict:
    """A rounded box centred on (x, y), ``w`` x ``h`` diagram units, with centred ``text``. ``fill``: a key of
    ``DIAGRAM_FILLS`` or any matplotlib colour; ``dashed``: a grey dashed outline and grey text (something the model
    does not have, drawn for contrast). Returns its anchors: {"t", "b", "l", "r"}: the middles of its four sides."""
    from matplotlib.patches import FancyBboxPatch

    if w <= 0 or h <= 0:
        raise ValueError(f"diagram_box needs a positive size, got {w} x {h}")
    if fontsize < MIN_FONT_PT:
        raise ValueError(f"fontsize {fontsize} is below the series' minimum of {MIN_FONT_PT} pt")
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=f"round,pad=0,rounding_size={rounding}",
                                fc=DIAGRAM_FILLS.get(fill, fill), ec="0.6" if dashed else "0.3", lw=1.2,
                                ls=(0, (4, 3)) if dashed else "-"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, linespacing=1.25,
            color="0.5" if dashed else "black")
    return {"t": (x, y + h / 2), "b": (x, y - h / 2), "l": (x - w / 2, y), "r": (x + w / 2, y)}


def diagram_arrow(ax, p0, p1, *, dashed: bool = False, color: str = "0.25", lw: float = 1.3, shrink: float = 0.0,
                  head: float = 15, label: str = "", label_at: float = 0.5, dx: float = 0.0, dy: float = 0.6,
                  ha: str = "center", fontsize: float = 10, label_color: str = "0.3", family: str | None = None):
    """An arrow from ``p0`` to ``p1`` (diagram units; ``diagram_box`` anchors fit). ``label``: text placed at
    ``label_at`` of the way along, shifted by (``dx``, ``dy``), bottom-aligned. Returns the label's Text or None."""
    if fontsize < MIN_FONT_PT:
        raise ValueError(f"fontsize {fontsize} is below the series' minimum of {MIN_FONT_PT} pt")
    ax.annotate("", xy=p1, xytext=p0, arrowprops=dict(
        arrowstyle="-|>", lw=lw, color="0.6" if dashed else color, shrinkA=shrink, shrinkB=shrink,
        mutation_scale=head, ls=(0, (4, 3)) if dashed else "-"))
    if not label:
        return None
    x = p0[0] + label_at * (p1[0] - p0[0]) + dx
    y = p0[1] + label_at * (p1[1] - p0[1]) + dy
    return ax.text(x, y, label, ha=ha, va="bottom", fontsize=fontsize, color=label_color, family=family)


def shape_label(x) -> str:
    """A tensor's shape as the diagrams print it: ``[2, 192, 8, 8]`` (also for a torch.Size or a tuple of sizes)."""
    dims = x.shape if hasattr(x, "shape") else x
    return "[" + ", ".join(str(v) for v in dims) + "]"
