"""Small helpers the notebooks share: device choice, seeding, parameter counts."""
from __future__ import annotations

import os
import random

import torch
from torch import Tensor

# ImageNet statistics: DINOv3 normalises its inputs (LVD-1689M models) with these, as every notebook does.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img: Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """(…, 3, H, W) in [0, 1] -> normalised with the ImageNet statistics."""
    m = torch.tensor(mean, dtype=img.dtype, device=img.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img - m) / s


def get_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or ``DINOLAB_DEVICE``), else CPU. Stored notebook outputs come from the CPU."""
    choice = prefer or os.environ.get("DINOLAB_DEVICE")
    if choice:
        return torch.device(choice)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
