"""Tests of dinolab.masking: exact mask counts, block shape, seeding, the collate ratios."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinolab.masking import MaskingGenerator, make_masks


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _neighbour_fraction(mask: torch.Tensor) -> float:
    m = mask.float()[None, None]
    k = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float32)[None, None]
    n = F.conv2d(m, k, padding=1)[0, 0]
    return ((n > 0) & mask).sum().item() / max(1, mask.sum().item())


def test_masking_generator_exact_counts_blocky_and_seeded():
    gen = MaskingGenerator((14, 14), max_num_patches=0.5 * 196)
    for count in (0, 1, 7, 20, 50, 98, 150):
        m = gen(count, generator=random.Random(count))
        assert m.dtype == torch.bool and m.shape == (14, 14)
        assert m.sum().item() == count
    fractions = [_neighbour_fraction(gen(40, generator=seed)) for seed in range(20)]
    assert np.mean(fractions) > 0.9  # blocks, not salt-and-pepper
    rand = torch.zeros(196, dtype=torch.bool)
    rand[torch.randperm(196, generator=_gen(0))[:40]] = True
    assert _neighbour_fraction(rand.view(14, 14)) < np.mean(fractions)
    assert torch.equal(gen(60, generator=3), gen(60, generator=3))
    assert torch.equal(gen(60, generator=_gen(5)), gen(60, generator=_gen(5)))
    assert not torch.equal(gen(60, generator=3), gen(60, generator=4))
    with pytest.raises(ValueError):
        gen(197)
    with pytest.raises(TypeError):
        gen(3, generator="seed")


def test_make_masks_collate_behaviour():
    n, hw = 16, (8, 8)
    masks = make_masks(n, hw, mask_probability=0.5, ratio_min_max=(0.1, 0.5), generator=0)
    assert masks.shape == (16, 64) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert (counts == 0).sum().item() == 8  # half the images unmasked
    masked = sorted(counts[counts > 0].tolist())
    assert len(masked) == 8
    # ratios spread linearly: the i-th masked image has int(64 * U(r_i, r_{i+1}))
    r = np.linspace(0.1, 0.5, 9)
    for i, c in enumerate(masked):
        assert int(64 * r[i]) - 1 <= c <= int(64 * r[i + 1])
    assert torch.equal(masks, make_masks(n, hw, generator=0))
    assert torch.equal(make_masks(n, hw, generator=_gen(1)), make_masks(n, hw, generator=_gen(1)))
    assert make_masks(4, 6, mask_probability=0.0, generator=0).sum() == 0
    with pytest.raises(ValueError):
        make_masks(4, 6, mask_probability=1.5)
