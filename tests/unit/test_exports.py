"""spec.export's formats (trainer/exports.py): a model the exporter cannot make, and an export that
answers otherwise than the torch model, are one line naming spec.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from thaw_contract.spec import SpecError
from trainer import exports


class Branchy(nn.Module):
    """Answers by a data-dependent branch: torch.export refuses it; a trace bakes in one side."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean((2, 3))
        if pooled.mean() > 0:  # traced with zeros: the other side is never recorded
            return self.fc(pooled)
        return -self.fc(pooled)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g) for _ in range(2)]


def test_a_model_the_onnx_exporter_cannot_make_is_one_line_naming_spec_export():
    wrapped = exports.Pixels(Branchy(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(SpecError) as err:
        exports.export("onnx", wrapped, 8, _batches, "branchy")
    line = str(err.value)
    assert line.startswith("spec.export: onnx: branchy cannot be exported (") and "\n" not in line


def test_a_trace_that_answers_otherwise_than_the_model_is_refused_with_its_measurements():
    # mean 0.5 is subtracted from pixels / 255: the zero example takes the negative branch,
    # the test images (mean ~0.5) do not always.
    model = Branchy()
    wrapped = exports.Pixels(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    with pytest.raises(SpecError, match=r"^spec\.export: torchscript: disagrees with the torch model on the test"):
        exports.export("torchscript", wrapped, 8, _batches, "branchy")


def test_a_faithful_export_reports_what_it_compared():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    wrapped = exports.Pixels(model, (0.4, 0.5, 0.6), (0.2, 0.2, 0.2))
    data, check = exports.export("torchscript", wrapped, 8, _batches, "linear")
    assert data[:2] == b"PK" and check["images"] == 8 and check["top1Agreement"] == 1.0
    assert check["maxLogitDiff"] <= exports.MAX_LOGIT_DIFF
