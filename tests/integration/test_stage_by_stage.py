"""`--stage K` after stage K-1 gives exactly what one process running every stage gives."""

from __future__ import annotations

import json
import sys

import pytest

from tests.integration.conftest import ROOT, run, write_job
from trainer.checkpoint import FINAL, stage_prefix

pytestmark = pytest.mark.integration
PY = sys.executable


def _finals(store_root, job="t"):
    out = []
    for k, name in enumerate(["head", "top3"]):
        out.append(json.loads((store_root / job / stage_prefix(k, name) / FINAL).read_text())["metrics"])
    return out


def test_stage_by_stage_equals_one_process(tmp_path, small_job):
    small_job["spec"]["deterministic"] = True
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    job_a = write_job(a, json.loads(json.dumps(small_job)))
    # b also warms up (the default on CUDA only): a frozen copy runs the stage's passes in a
    # thread while the checkpoint and data load. The weights must not notice.
    small_job["spec"]["speed"] = {"warmup": "on"}
    job_b = write_job(b, json.loads(json.dumps(small_job)))
    out_a = run([PY, "-m", "trainer", "run", str(job_a)]).stdout
    assert "warm-up" not in out_a
    missing = run_fail([PY, "-m", "trainer", "run", str(job_b), "--stage", "1"])
    assert "stage 0 (head) has no final checkpoint" in missing
    for k in (0, 1):  # stage 0 warms the feature-cache pass (forward only), stage 1 fwd + bwd
        out = run([PY, "-m", "trainer", "run", str(job_b), "--stage", str(k)]).stdout
        assert "warm-up: " in out and "beside loading the checkpoint and the data" in out
    fa, fb = _finals(a / "store"), _finals(b / "store")
    assert [f["weights_sha256"] for f in fa] == [f["weights_sha256"] for f in fb]
    assert [f["test_accuracy"] for f in fa] == [f["test_accuracy"] for f in fb]
    assert fa[0]["weights_sha256"] != fa[1]["weights_sha256"]

    # The data held in memory as one resized tensor (the default on CUDA): the same batches.
    c = tmp_path / "c"
    c.mkdir()
    small_job["spec"]["speed"] = {"dataOnDevice": "on"}
    run([PY, "-m", "trainer", "run", str(write_job(c, json.loads(json.dumps(small_job))))])
    assert [f["weights_sha256"] for f in _finals(c / "store")] == [f["weights_sha256"] for f in fa]

    again = run([PY, "-m", "trainer", "run", str(job_a)])
    assert "already finished; nothing to do" in again.stdout
    assert _finals(a / "store") == fa, "a finished job run again must not touch its checkpoints"


def test_out_of_range_stage_is_one_clear_line(tmp_path, small_job):
    job = write_job(tmp_path, small_job)
    err = run_fail([PY, "-m", "trainer", "run", str(job), "--stage", "5"])
    assert "--stage 5: the job has stages 0..1" in err


def run_fail(cmd):
    import subprocess

    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]
