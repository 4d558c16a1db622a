"""A checkpoint from another architecture or spec is refused in one line, and nothing stored changes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import with_path
from tests.integration.conftest import ROOT, run, write_job

pytestmark = pytest.mark.integration


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "change,expected",
    [
        (("spec.stages.0.lr", 0.5), "error: spec: checkpoint file://"),
        (("spec.model.architecture", "mobilenet_v3_small"), "error: spec.model.architecture: checkpoint file://"),
    ],
)
def test_other_spec_or_architecture_is_refused_and_nothing_changes(small_job, tmp_path, change, expected):
    small_job["spec"]["stages"] = small_job["spec"]["stages"][:1]
    small_job["spec"]["metrics"] = {"enabled": False}
    job = write_job(tmp_path, small_job)
    run([sys.executable, "-m", "trainer", "run", str(job)], THAW_TERMINATION_LOG=str(tmp_path / "termination"))
    before = _snapshot(tmp_path / "store")
    # What `kubectl get pod -o yaml` would show as the container's termination message.
    message = json.loads((tmp_path / "termination").read_text())
    assert message["checkpoint"] == f"file://{tmp_path}/store/t/stage-00-head/epoch-0000"
    assert message["name"] == "head" and 0 <= message["metrics"]["valAccuracy"] <= 1
    assert len(message["manifestSha256"]) == 64

    doc = with_path(small_job, *change)
    if change[0] == "spec.model.architecture":
        doc["spec"]["model"]["weights"] = None
    other = write_job(tmp_path, doc, "other.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(other)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert "stage-00-head/epoch-0000" in lines[0]
    assert _snapshot(tmp_path / "store") == before
