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


def test_the_quality_table_runs_on_any_image_folder(tmp_path):
    """benchmarks/quality_table.py --source file://... --num-classes N (here the digits as PNGs)."""
    import subprocess

    import torch
    from sklearn.datasets import load_digits
    from torchvision.io import write_png

    from tests.integration.conftest import ROOT

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):  # 1,797: 30 per class left after validation
        folder = tmp_path / "digits" / ("test" if i % 4 == 0 else "train") / f"c{y}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(torch.from_numpy((img * 255 / 16).round().astype("uint8"))[None], str(folder / f"{i}.png"))
    out = tmp_path / "results.md"
    cmd = [
        sys.executable,
        "benchmarks/quality_table.py",
        "--source",
        f"file://{tmp_path}/digits",
        "--num-classes",
        "10",
        "--budgets",
        "5",
        "--seeds",
        "0",
        "--methods",
        "logreg",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    text = out.read_text()
    assert f"--source file://{tmp_path}/digits --num-classes 10" in text
    row = next(line for line in text.splitlines() if line.startswith("| 5 | logistic regression"))
    assert 0.3 < float(row.split("|")[3].split("±")[0]) <= 1.0  # 5 images per class, 10 classes: above chance
