"""DINO multi-crop augmentation in torch only: ``MultiCropAugmentation`` turns (B, 3, H, W) images in
[0, 1] into 2 global and n_local local crops per image, plus the pieces it is built from
(``crop_and_resize``, ``rgb_to_hsv``/``hsv_to_rgb``, ``denormalize``).
Official: ``dinov3/data/augmentations.py`` (``DataAugmentationDINO``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["rgb_to_hsv", "hsv_to_rgb", "crop_and_resize", "denormalize", "MultiCropAugmentation"]


_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(-3)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """(..., 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = x.unbind(-3)
    maxc = x.amax(dim=-3)
    minc = x.amin(dim=-3)
    delta = maxc - minc
    gray_px = delta == 0
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    d = torch.where(gray_px, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray_px, torch.zeros_like(h), (h / 6.0) % 1.0)
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = x.unbind(-3)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    r = torch.stack([v, q, p, p, t, v], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    g = torch.stack([t, v, v, q, p, p], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    b = torch.stack([p, p, t, v, v, q], dim=-3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    return torch.stack([r, g, b], dim=-3)


def crop_and_resize(
    images: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    flip: Tensor | None = None,
    mode: str = "bilinear",
    antialias: bool = True,
) -> Tensor:
    """One crop per image, resampled to ``size``, without a loop over images.

    ``images`` (B, C, H, W); ``boxes`` (B, 4) = (x0, y0, x1, y1) in pixel-edge coordinates (the box
    (0, 0, W, H) is the whole image; fractional boxes are fine); ``flip`` (B,) bool mirrors the crop
    horizontally. Each box becomes an affine map of the output grid onto the input
    (``F.affine_grid`` + ``F.grid_sample``, align_corners=False, border padding), so a full box at the
    input size is the identity. ``antialias``: when a crop is shrunk by more than 1.5×, sample at
    k× the output size (k ≤ 4) and average-pool k×k, a cheap stand-in for PIL's antialiased resize.
    """
    B, C, H, W = images.shape
    if boxes.shape != (B, 4):
        raise ValueError(f"boxes must be (B={B}, 4), got {tuple(boxes.shape)}")
    oh, ow = (size, size) if isinstance(size, int) else size
    boxes = boxes.to(device=images.device, dtype=torch.float32)
    x0, y0, x1, y1 = boxes.unbind(-1)
    sx, sy = (x1 - x0) / W, (y1 - y0) / H
    cx, cy = (x0 + x1) / W - 1.0, (y0 + y1) / H - 1.0
    if flip is not None:
        sx = torch.where(flip.to(images.device).bool(), -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], -1), torch.stack([zero, sy, cy], -1)], dim=-2)
    k = 1
    if antialias:
        shrink = max(float(((x1 - x0) / ow).max()), float(((y1 - y0) / oh).max()))
        k = int(min(4, max(1, round(shrink))))
    src = images if images.is_floating_point() else images.float()
    grid = F.affine_grid(theta.to(src.dtype), [B, C, oh * k, ow * k], align_corners=False)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="border", align_corners=False)
    if k > 1:
        out = F.avg_pool2d(out, k)
    return out


def denormalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo the ImageNet normalisation of (..., 3, H, W) images (for display)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class MultiCropAugmentation:
    """DINO multi-crop (``DataAugmentationDINO``) on a batch, in torch only.

    ``__call__(images (B, 3, H, W) float in [0, 1] (or uint8), generator=None) -> dict``:

    * ``global_crops`` (2·B, 3, G, G) and ``local_crops`` (n_local·B, 3, L, L), crop-major as the
      official collate stacks them: rows [c·B, (c+1)·B) are crop c of every image;
    * ``global_boxes`` (2, B, 4), ``local_boxes`` (n_local, B, 4): (x0, y0, x1, y1) in source pixels;
      ``global_flips`` (2, B), ``local_flips`` (n_local, B) bool — for plotting.

    Per crop, as the official pipeline: RandomResizedCrop (torchvision's sampling: area fraction
    ~ U(scale), log aspect ~ U(log ratio), 10 tries then a centre crop), horizontal flip (p
    ``hflip_p``), colour jitter with p ``color_jitter_p`` (brightness 0.4, contrast 0.4, saturation
    0.2, hue 0.1, in a random order per crop), grayscale (p ``grayscale_p``), Gaussian blur (kernel 9,
    σ ~ U(0.1, 2), reflect padding) with p ``blur_p`` = (global 1, global 2, local), solarize (p
    ``solarize_p``, second global crop only), then ImageNet normalisation if ``normalize``.
    The teacher sees the same global crops.

    ``blur_p`` default (1.0, 0.1, 0.5) are the probabilities the official code *means*. Its
    ``GaussianBlur(p)`` wraps ``RandomApply(p=1 - p)``, which applies the blur with probability 1 − p
    (global 1 never blurred, global 2 blurred 90 %, local 50 %); pass
    ``official_blur_inversion=True`` to reproduce that.

    Every random number is drawn on the CPU from ``generator`` (a torch.Generator; None = torch's
    global RNG), in a fixed order, so a seeded generator gives identical crops on any device.
    Crops are resampled with ``crop_and_resize`` (one ``grid_sample`` per crop index, none per image);
    ``interpolation`` "bilinear" (default) or "bicubic" (the official uses bicubic; the result is
    clamped to [0, 1]).
    """

    def __init__(
        self,
        global_size: int = 112,
        local_size: int = 48,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_p: float = 0.5,
        color_jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int = 9,
        solarize_p: float = 0.2,
        official_blur_inversion: bool = False,
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        antialias: bool = True,
        patch_size: int = 16,
    ):
        for name, s in (("global_size", global_size), ("local_size", local_size)):
            if not isinstance(s, int) or s < patch_size or s % patch_size:
                raise ValueError(f"{name} must be a positive multiple of patch_size={patch_size}, got {s!r}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
        probs = [hflip_p, color_jitter_p, grayscale_p, solarize_p, *blur_p]
        if len(blur_p) != 3 or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError("probabilities must be in [0, 1] and blur_p must have 3 entries")
        if blur_kernel_size % 2 != 1 or blur_kernel_size // 2 >= local_size:
            raise ValueError(f"blur_kernel_size must be odd and smaller than the crops, got {blur_kernel_size}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the colour wheel, either way), got {hue!r}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.global_scale, self.local_scale, self.ratio = tuple(global_scale), tuple(local_scale), tuple(ratio)
        self.hflip_p, self.color_jitter_p, self.grayscale_p = hflip_p, color_jitter_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        if official_blur_inversion:
            blur_p = tuple(1.0 - p for p in blur_p)
        self.blur_p = tuple(blur_p)
        self.blur_sigma, self.blur_kernel_size = tuple(blur_sigma), blur_kernel_size
        self.solarize_p = solarize_p
        self.normalize = normalize
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.antialias = interpolation, antialias

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(2 x {self.global_size}px scale {self.global_scale}, "
            f"{self.n_local} x {self.local_size}px scale {self.local_scale}, normalize={self.normalize})"
        )

    # --- geometry ---------------------------------------------------------------------------------
    def sample_boxes(self, n: int, H: int, W: int, scale, g: torch.Generator | None, attempts: int = 10) -> Tensor:
        """torchvision ``RandomResizedCrop.get_params`` for n crops at once -> (n, 4) xyxy float."""
        area = H * W
        target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * torch.rand(n, attempts, generator=g, dtype=torch.float64))
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt
        has = ok.any(dim=1)
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        u = torch.rand(n, 2, generator=g, dtype=torch.float64)
        top = torch.floor(u[:, 0] * (H - h + 1))
        left = torch.floor(u[:, 1] * (W - w + 1))
        # fallback: centre crop with the aspect ratio clamped into range
        in_ratio = W / H
        if in_ratio < self.ratio[0]:
            fw, fh = W, round(W / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fh, fw = H, round(H * self.ratio[1])
        else:
            fw, fh = W, H
        w = torch.where(has, w, torch.full_like(w, fw))
        h = torch.where(has, h, torch.full_like(h, fh))
        top = torch.where(has, top, torch.full_like(top, (H - fh) // 2))
        left = torch.where(has, left, torch.full_like(left, (W - fw) // 2))
        return torch.stack([left, top, left + w, top + h], dim=-1).float()

    # --- photometry (all vectorised over the crops) ---------------------------------------------
    def _color_jitter(self, x: Tensor, g) -> Tensor:
        n = x.shape[0]
        apply = torch.rand(n, generator=g) < self.color_jitter_p
        order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
        b = _uniform(n, max(0.0, 1 - self.brightness), 1 + self.brightness, g).float()
        c = _uniform(n, max(0.0, 1 - self.contrast), 1 + self.contrast, g).float()
        s = _uniform(n, max(0.0, 1 - self.saturation), 1 + self.saturation, g).float()
        hf = _uniform(n, -self.hue, self.hue, g).float()
        dev = x.device
        apply, order, b, c, s, hf = (t.to(dev) for t in (apply, order, b, c, s, hf))

        def op(k: int, y: Tensor, sel: Tensor) -> Tensor:
            if k == 0:  # brightness: blend with black
                return (y * b[sel].view(-1, 1, 1, 1)).clamp(0, 1)
            if k == 1:  # contrast: blend with the mean grey level of the crop
                f = c[sel].view(-1, 1, 1, 1)
                m = _gray(y).mean(dim=(-3, -2, -1), keepdim=True)
                return (f * y + (1 - f) * m).clamp(0, 1)
            if k == 2:  # saturation: blend with the grey image
                f = s[sel].view(-1, 1, 1, 1)
                return (f * y + (1 - f) * _gray(y)).clamp(0, 1)
            hsv = rgb_to_hsv(y)  # hue: rotate the hue channel
            hsv = torch.cat([(hsv[:, :1] + hf[sel].view(-1, 1, 1, 1)) % 1.0, hsv[:, 1:]], dim=1)
            return hsv_to_rgb(hsv).clamp(0, 1)

        for step in range(4):
            new = x.clone()
            for k in range(4):
                sel = apply & (order[:, step] == k)
                if bool(sel.any()):
                    new[sel] = op(k, x[sel], sel)
            x = new
        return x

    def _grayscale(self, x: Tensor, g) -> Tensor:
        sel = (torch.rand(x.shape[0], generator=g) < self.grayscale_p).to(x.device)
        return torch.where(sel.view(-1, 1, 1, 1), _gray(x).expand_as(x), x)

    def _blur(self, x: Tensor, p: float, g) -> Tensor:
        n, C, H, W = x.shape
        sel = torch.rand(n, generator=g) < p
        sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], g)
        if not bool(sel.any()):
            return x
        half = self.blur_kernel_size // 2
        t = torch.arange(-half, half + 1, dtype=torch.float64)
        ker = torch.exp(-0.5 * (t / sigma[sel].unsqueeze(1)) ** 2)
        ker = (ker / ker.sum(dim=1, keepdim=True)).to(x.dtype).to(x.device)  # (m, k)
        sel = sel.to(x.device)
        y = x[sel]
        m = y.shape[0]
        wk = ker.repeat_interleave(C, dim=0)  # (m*C, k)
        z = F.pad(y.reshape(1, m * C, H, W), (half, half, half, half), mode="reflect")
        z = F.conv2d(z, wk.view(m * C, 1, 1, -1), groups=m * C)
        z = F.conv2d(z, wk.view(m * C, 1, -1, 1), groups=m * C)
        out = x.clone()
        out[sel] = z.reshape(m, C, H, W)
        return out

    def _solarize(self, x: Tensor, p: float, g) -> Tensor:
        sel = (torch.rand(x.shape[0], generator=g) < p).to(x.device).view(-1, 1, 1, 1)
        return torch.where(sel & (x >= 128 / 255), 1.0 - x, x)

    def _views(self, images: Tensor, n_views: int, size: int, scale, blur_p: Sequence[float],
               solarize_p: Sequence[float], g, second: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, _, H, W = images.shape
        source = lambda v: images if second is None or v % 2 == 0 else second  # noqa: E731 - odd views from `second`
        boxes = self.sample_boxes(n_views * B, H, W, scale, g).view(n_views, B, 4)
        flips = (torch.rand(n_views, B, generator=g) < self.hflip_p)
        crops = torch.cat([
            crop_and_resize(source(v), boxes[v], size, flips[v], mode=self.interpolation, antialias=self.antialias)
            for v in range(n_views)  # loop over crop index only; each call handles all B images
        ])
        if self.interpolation == "bicubic":
            crops = crops.clamp(0, 1)
        crops = self._color_jitter(crops, g)
        crops = self._grayscale(crops, g)
        crops = torch.cat([self._blur(cv, blur_p[v], g) for v, cv in enumerate(crops.split(B))])
        crops = torch.cat([self._solarize(cv, solarize_p[v], g) for v, cv in enumerate(crops.split(B))])
        if self.normalize:
            m = torch.tensor(self.mean, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=crops.dtype, device=crops.device).view(1, -1, 1, 1)
            crops = (crops - m) / s
        return crops, boxes, flips

    def __call__(self, images: Tensor, generator: torch.Generator | None = None,
                 second: Tensor | None = None) -> dict[str, Tensor]:
        """``second``: optionally another render of the same scenes (same shape as ``images``, e.g.
        ``ShapesWorld.batch(idx, appearance=...)``); the second global crop and every odd local crop are
        then cut from it, so two views of an image share its layout but not its colours."""
        images = self._check_images("images", images)
        if second is not None:
            second = self._check_images("second", second)
            if second.shape != images.shape:
                raise ValueError(f"second must have the shape of images {tuple(images.shape)}, got {tuple(second.shape)}")
        g = generator
        gl, gboxes, gflips = self._views(
            images, 2, self.global_size, self.global_scale, self.blur_p[:2], (0.0, self.solarize_p), g, second
        )
        out = {"global_crops": gl, "global_boxes": gboxes, "global_flips": gflips}
        if self.n_local:
            lc, lboxes, lflips = self._views(
                images, self.n_local, self.local_size, self.local_scale,
                (self.blur_p[2],) * self.n_local, (0.0,) * self.n_local, g, second,
            )
        else:
            B = images.shape[0]
            lc = images.new_zeros(0, 3, self.local_size, self.local_size)
            lboxes, lflips = torch.zeros(0, B, 4), torch.zeros(0, B, dtype=torch.bool)
        out.update(local_crops=lc, local_boxes=lboxes, local_flips=lflips)
        return out

    @staticmethod
    def _check_images(name: str, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must be 4-D (B, 3, H, W) with 3 channels, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            return images.float() / 255.0
        if not images.is_floating_point():
            raise TypeError(f"{name} must be float in [0, 1] or uint8, got {images.dtype}")
        images = images.float()
        lo, hi = float(images.min()), float(images.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float {name} must be in [0, 1] (not normalised), got range [{lo:.3f}, {hi:.3f}]")
        return images
