"""Tests of dinolab.schedules: the EMA teacher update and the schedules' end points."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dinolab.schedules import cosine_schedule, linear_warmup_then_constant, update_ema


def test_update_ema_formula_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student[1].running_mean.fill_(2.0)
    t_before = {n: p.clone() for n, p in teacher.named_parameters()}
    update_ema(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * t_before[n] + 0.1 * dict(student.named_parameters())[n])
        assert not p.requires_grad or p.grad is None
    torch.testing.assert_close(teacher[1].running_mean, torch.full((3,), 2.0))
    snapshot = [p.clone() for p in teacher.parameters()]
    update_ema(teacher, student, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, teacher.parameters()))
    update_ema(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(student.parameters(), teacher.parameters()))
    with pytest.raises(ValueError):
        update_ema(teacher, student, 1.5)
    with pytest.raises(ValueError):
        update_ema(nn.Linear(4, 3), student, 0.5)


def test_schedules_endpoints():
    m = cosine_schedule(0.992, 1.0, 100)
    assert len(m) == 100 and m[0] == 0.992 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
    t = linear_warmup_then_constant(0.04, 0.07, total_steps=50, warmup_steps=10)
    assert len(t) == 50 and t[0] == 0.04 and np.isclose(t[5], 0.055)
    assert np.allclose(t[10:], 0.07) and np.all(np.diff(t[:11]) > 0)
    lr = cosine_schedule(1e-3, 1e-6, 30, warmup_steps=5, start_warmup=0.0)
    assert lr[0] == 0.0 and lr[5] == 1e-3 and np.isclose(lr[-1], 1e-6) and lr.argmax() == 5
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 10, warmup_steps=11)
