"""lr: auto — the range test's schedule, its stop and the suggestion; the spec's errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.builders import job_doc, with_path
from thaw_contract.spec import SpecError, parse_job
from trainer.lr_finder import END, START, range_test, schedule, suggest


def test_the_schedule_spans_start_to_end_geometrically():
    lrs = schedule(5, 1e-4, 1.0)
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([10.0] * 4)
    assert schedule()[0] == START and schedule()[-1] == pytest.approx(END)


def test_the_suggestion_is_a_tenth_of_the_rate_at_the_lowest_finite_loss():
    assert suggest([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.5, 1.1, math.nan]) == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="no finite loss"):
        suggest([1.0], [math.inf])


def test_the_test_stops_once_the_loss_explodes_and_keeps_the_group_ratios():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    data = TensorDataset(30 * torch.randn(64, 4), torch.randint(0, 3, (64,)))  # large inputs: it blows up early
    opt = torch.optim.SGD(
        [{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}], lr=1.0, momentum=0.9
    )
    lrs, losses = range_test(
        model,
        DataLoader(data, batch_size=8),
        opt,
        lambda x: x,
        torch.device("cpu"),
        lambda: torch.autocast("cpu", enabled=False),
    )
    assert 10 < len(lrs) < 100  # it went round the 8 batches and stopped when the loss blew up
    assert lrs == schedule()[: len(lrs)] and len(losses) == len(lrs)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * lrs[-1])  # the bias kept half the head's rate
    assert losses[-1] > 4 * min(losses[:-1]) or not math.isfinite(losses[-1])


@pytest.mark.parametrize(
    "lr,groups,message",
    [
        ("fast", None, "spec.stages[1].lr: must be a positive number or auto (got 'fast')"),
        (0, None, "spec.stages[1].lr: must be a positive number or auto (got 0)"),
        ("auto", [0.1, 0.01, 0.001], "spec.stages[1]: groupLrs fixes the rates that lr: auto would pick"),
    ],
)
def test_bad_lr_fields_are_one_line(lr, groups, message):
    doc = with_path(job_doc(), "spec.stages.1.lr", lr)
    if groups:
        doc["spec"]["stages"][1]["groupLrs"] = groups
    with pytest.raises(SpecError) as err:
        parse_job(doc)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
