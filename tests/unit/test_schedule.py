"""Learning-rate schedules: pure multipliers, checked against torch's own implementations."""

from __future__ import annotations

import math

import pytest
import torch

from thaw_contract.spec import ScheduleSpec
from trainer.schedule import lr_factor


def test_onecycle_matches_torch_onecycle():
    cfg = ScheduleSpec(name="onecycle", pct_start=0.3, div_factor=25, final_div_factor=1e4)
    total = 40
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, cycle_momentum=False)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(step, total, 0, cfg), rel=1e-9, abs=1e-12)
        opt.step()
        ref.step()


def test_cosine_with_warmup_rises_then_falls_to_the_floor():
    cfg = ScheduleSpec(name="cosine", min_lr_factor=0.1)
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, cfg) for s in range(total)]
    assert f[:warmup] == sorted(f[:warmup]) and f[0] == pytest.approx(1 / 11)
    assert f[warmup] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1 :]))
    assert f[-1] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 89 / 90)) / 2)


def test_cosine_without_warmup_matches_torch_cosine_annealing():
    cfg = ScheduleSpec(name="cosine")
    total = 25
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(step, total, 0, cfg), abs=1e-9)
        opt.step()
        ref.step()


def test_constant_is_flat_after_warmup():
    cfg = ScheduleSpec(name="constant")
    assert [lr_factor(s, 10, 2, cfg) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
