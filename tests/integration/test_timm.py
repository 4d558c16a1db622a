"""A timm architecture trains through every stage kind: cached head, top groups, all."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.conftest import run, write_job
from trainer.checkpoint import FINAL, stage_prefix

pytestmark = pytest.mark.integration


def test_a_timm_convnext_trains_stage_by_stage(tmp_path, small_job):
    small_job["spec"]["model"] = {"architecture": "timm/convnext_atto", "numClasses": 10}  # random init: no hub
    small_job["spec"]["stages"] = [
        {"name": "head", "trainable": {"top": 1}, "epochs": 1, "lr": 0.05},
        {"name": "top2", "trainable": {"top": 2}, "epochs": 1, "lr": 0.01},
        {"name": "all", "trainable": "all", "epochs": 1, "lr": 0.01, "lrDecay": 1.5},
    ]
    job = write_job(tmp_path, small_job)
    plan = run([sys.executable, "-m", "trainer", "plan", str(job)]).stdout
    assert "groups (stem -> head): stem=2,040, stage1=30,240" in plan and "top=640, head=3,210" in plan
    run([sys.executable, "-m", "trainer", "run", str(job)])
    rows = [
        json.loads((tmp_path / "store/t" / stage_prefix(k, n) / FINAL).read_text())["metrics"]
        for k, n in enumerate(["head", "top2", "all"])
    ]
    assert [r["trainable_params"] for r in rows] == [3_210, 3_850, 3_377_730]
    assert rows[0]["feature_cache"] is True
    assert rows[-1]["test_accuracy"] > 0.5  # digits: well above chance (0.1) even from random init
