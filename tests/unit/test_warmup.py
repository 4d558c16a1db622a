"""Warm-up: runs the stage's passes on a copy, times both layouts when asked, surfaces errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.stage_checkpoints import state_digest
from trainer.warmup import Background, time_layouts, warm_up


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_warm_up_runs_on_the_copy_and_leaves_the_model_as_it_was():
    model = _convnet()
    before = state_digest(model)
    twin = copy.deepcopy(model)
    seen = []
    twin.register_forward_pre_hook(lambda m, args: seen.append((m.training, tuple(args[0].shape))))
    r = warm_up(twin, torch.randn(5, 3, 16, 16), lambda: torch.autocast("cpu", enabled=False), True, False)
    assert seen == [(True, (5, 3, 16, 16)), (False, (5, 3, 16, 16))]  # the training pass, then evaluation
    assert r.seconds > 0 and r.channels_last is None and r.step_seconds == {}
    assert state_digest(model) == before
    assert all(p.grad is None for p in twin.parameters())  # gradients are not left behind


def test_both_layouts_are_timed_and_the_faster_kept():
    twin = _convnet()
    faster, timings = time_layouts(twin, torch.randn(4, 3, 16, 16), lambda: torch.autocast("cpu", enabled=False), True)
    assert set(timings) == {"channels_last", "contiguous"} and all(t > 0 for t in timings.values())
    assert faster == (timings["channels_last"] <= timings["contiguous"])


def test_an_error_in_the_warm_up_is_raised_where_it_is_joined():
    def boom():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        Background(boom).result()


def test_warmup_is_a_spec_field_with_a_clear_error():
    from tests.builders import job_doc
    from thaw_contract.spec import SpecError, parse_job

    assert parse_job(job_doc()).spec.speed.warmup == "auto"
    with pytest.raises(SpecError, match=r"spec.speed.warmup: must be 'auto', 'on' or 'off' \(got False\); YAML"):
        parse_job(job_doc(speed={"warmup": False}))
