"""Small helpers the notebooks share: device choice, seeding, parameter counts."""
from __future__ import annotations

import os
import random

import torch


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
