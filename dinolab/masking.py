"""iBOT masks: block-wise ``MaskingGenerator`` for one (h, w) patch grid, and ``make_masks`` for a
batch of global crops, (n_images, h*w) bool. Official: ``dinov3/data/masking.py`` (and the mask
ratios of ``dinov3/data/collate.py``).
"""
from __future__ import annotations

import math
import random

import torch
from torch import Tensor

__all__ = ["MaskingGenerator", "make_masks"]


def _as_random(generator) -> random.Random:
    """None -> python's global ``random`` state; int -> random.Random(seed); random.Random -> itself;
    torch.Generator -> a random.Random seeded from one draw of that generator."""
    if generator is None:
        return random._inst  # the module-level functions' state, as the official code uses
    if isinstance(generator, random.Random):
        return generator
    if isinstance(generator, torch.Generator):
        return random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    if isinstance(generator, int) and not isinstance(generator, bool):
        return random.Random(generator)
    raise TypeError(f"generator must be None, an int, random.Random or torch.Generator, got {type(generator).__name__}")


class MaskingGenerator:
    """Block-wise masking of a patch grid (BEiT/iBOT), as ``dinov3/data/masking.py``.

    ``__call__(num_masking_patches=0, generator=None)`` -> bool tensor (h, w) with exactly
    ``num_masking_patches`` True entries. Rectangles are added one at a time: area
    ~ U(min_num_patches, max_mask_patches), log aspect ~ U(log min_aspect, log max_aspect), position
    uniform; a rectangle is kept only if it adds between 1 and ``max_mask_patches`` new patches
    (10 tries per rectangle, ``max_mask_patches`` = min(remaining, max_num_patches)). When no try adds
    anything the loop stops, and the mask is completed with uniformly random patches to the exact count.

    ``generator``: None (python's global ``random``), an int seed, a ``random.Random`` or a
    ``torch.Generator``. The official code uses ``random`` for the blocks and ``np.random`` for the
    completion; here both come from the one ``random.Random``, so a seed fixes the mask.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        if not isinstance(input_size, tuple):
            input_size = (int(input_size),) * 2
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"input_size must be (h, w) with positive sides, got {input_size}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        if self.max_num_patches is None:
            self.max_num_patches = self.num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], log aspect [{self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: Tensor, max_mask_patches: float, rng: random.Random) -> int:
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                n_new = h * w - int(block.sum())
                if 0 < n_new <= max_mask_patches:
                    block.fill_(True)
                    delta += n_new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int = 0, generator=None) -> Tensor:
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(f"num_masking_patches must be in [0, {self.num_patches}], got {num_masking_patches}")
        rng = _as_random(generator)
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches, rng)
            if delta == 0:
                break
            mask_count += delta
        return self.complete_mask_randomly(mask, num_masking_patches, rng)

    @staticmethod
    def complete_mask_randomly(mask: Tensor, num_masking_patches: int, rng: random.Random) -> Tensor:
        flat = mask.flatten()
        free = (~flat).nonzero().flatten().tolist()
        to_add = rng.sample(free, num_masking_patches - int(flat.sum()))
        if to_add:
            flat[torch.tensor(to_add, dtype=torch.long)] = True
        return flat.reshape(mask.shape)


def make_masks(
    n_images: int,
    grid_hw: int | tuple[int, int],
    mask_probability: float = 0.5,
    ratio_min_max: tuple[float, float] = (0.1, 0.5),
    generator=None,
    mask_generator: MaskingGenerator | None = None,
) -> Tensor:
    """iBOT masks for a batch of global crops, as ``collate_data_and_cast`` -> bool (n_images, h*w).

    ``int(n_images · mask_probability)`` images are masked; the i-th of them gets
    ``int(N · U(r_i, r_{i+1}))`` masked patches with r = linspace(ratio_min, ratio_max, n_masked + 1)
    (so the ratios are spread over the whole range rather than drawn independently); the others get
    no mask; the list is then shuffled. ``mask_generator`` defaults to the one built in
    ``dinov3/train/train.py``: ``MaskingGenerator(grid_hw, max_num_patches=0.5 · N)``.
    ``generator`` as in ``MaskingGenerator`` (one stream drives counts, blocks and shuffle).
    """
    if not isinstance(grid_hw, tuple):
        grid_hw = (int(grid_hw),) * 2
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    lo, hi = ratio_min_max
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_min_max must satisfy 0 <= min <= max <= 1, got {ratio_min_max}")
    h, w = grid_hw
    N = h * w
    if mask_generator is None:
        mask_generator = MaskingGenerator((h, w), max_num_patches=0.5 * N)
    elif mask_generator.get_shape() != (h, w):
        raise ValueError(f"mask_generator grid {mask_generator.get_shape()} != grid_hw {(h, w)}")
    rng = _as_random(generator)
    n_masked = int(n_images * mask_probability)
    probs = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else []
    masks = []
    for i in range(n_masked):
        masks.append(mask_generator(int(N * rng.uniform(probs[i], probs[i + 1])), generator=rng))
    for _ in range(n_masked, n_images):
        masks.append(mask_generator(0, generator=rng))
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, N, dtype=torch.bool)
    return torch.stack(masks).flatten(1)
