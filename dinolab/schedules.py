"""The EMA teacher update and the per-iteration schedules (learning rate, teacher momentum, teacher
temperature), as float64 arrays of length ``total_steps``. Official: ``dinov3/train/cosine_lr_scheduler.py``
(and the EMA step of ``dinov3/train/ssl_meta_arch.py``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["update_ema", "cosine_schedule", "linear_warmup_then_constant"]


@torch.no_grad()
def update_ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter ← m·teacher + (1 − m)·student; buffers are copied from the
    student. The two modules must have the same parameter and buffer names."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student have different parameter names")
    for name, tp in t_params.items():
        sp = s_params[name]
        if sp.shape != tp.shape:
            raise ValueError(f"parameter {name}: teacher {tuple(tp.shape)} vs student {tuple(sp.shape)}")
        tp.mul_(momentum).add_(sp.detach().to(tp.dtype), alpha=1.0 - momentum)
    s_bufs = dict(student.named_buffers())
    for name, tb in teacher.named_buffers():
        tb.copy_(s_bufs[name])


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Per-iteration values (float64 array of length ``total_steps``), as the official
    ``linear_warmup_cosine_decay(start_warmup, base, final, warmup_steps, total_steps)``: a linear ramp
    ``start_warmup -> base`` over ``warmup_steps`` (end point excluded), then a half cosine from
    ``base`` (first step after warm-up) to exactly ``final`` (last step).

    Teacher momentum: ``cosine_schedule(0.992, 1.0, total)``.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got {total_steps}, {warmup_steps}")
    linear = np.linspace(start_warmup, base, warmup_steps, endpoint=False)
    cosine = (np.cos(np.linspace(0.0, np.pi, total_steps - warmup_steps)) + 1.0) / 2.0
    cosine = (base - final) * cosine + final
    return np.concatenate([linear, cosine])


def linear_warmup_then_constant(start: float, peak: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear ``start -> peak`` over ``warmup_steps`` (end point excluded), then ``peak``.

    Teacher temperature: ``linear_warmup_then_constant(0.04, 0.07, total, warmup)``.
    """
    return cosine_schedule(peak, peak, total_steps, warmup_steps=warmup_steps, start_warmup=start)
