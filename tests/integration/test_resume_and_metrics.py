"""Real 2-process runs: exact resume after SIGKILL, a final checkpoint that cannot commit,
and every rank's metrics scraped by a real Prometheus."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.net import free_ports, wait_until
from testbed.prometheus import Prometheus
from tests.integration.conftest import ROOT, run, torchrun, write_job
from thaw_contract.spec import CheckpointSpec, ScheduleSpec
from trainer import checkpoint as ckpt
from trainer.schedule import lr_factor
from trainer.storage import open_store

pytestmark = pytest.mark.integration
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _resume_job(small_job, uri: str, port: int) -> dict:
    small_job["spec"]["stages"][1]["epochs"] = 5
    small_job["spec"]["deterministic"] = True
    small_job["spec"]["checkpoint"] = {"uri": uri, "keepLast": 2}
    small_job["spec"]["metrics"] = {"port": port}
    small_job["spec"]["data"]["augmentation"] = {"hflip": True}  # RNG in the data path too
    return small_job


def _finals(uri: str) -> list[dict]:
    store = open_store(CheckpointSpec(uri=uri), "t", write=False)
    return [ckpt.read_pointer(store, i, n)["metrics"] for i, n in ((0, "head"), (1, "top3"))]


def _comparable(summary: dict) -> dict:
    """What must match between an interrupted and an uninterrupted run (not wall times)."""
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    return {
        "weights": summary["weights_sha256"],
        "test": (summary["test_accuracy"], summary["test_loss"]),
        "history": [{k: row[k] for k in keys} for row in summary["history"]],
    }


def test_sigkilled_stage_resumes_to_identical_weights_and_metrics(small_job, tmp_path, s3_env, seaweed):
    port = free_ports(1)[0]
    # Uninterrupted, on the local file store.
    ref = write_job(tmp_path, _resume_job(small_job, f"file://{tmp_path}/ref", port), "ref.yaml")
    torchrun(2, "-m", "trainer", "run", str(ref))
    expected = _finals(f"file://{tmp_path}/ref")

    # Interrupted: SIGKILL rank 1 once stage 1 has committed its second epoch, in SeaweedFS.
    uri = "s3://thaw/resume"
    job = write_job(tmp_path, _resume_job(small_job, uri, port), "s3.yaml")
    store = open_store(CheckpointSpec(uri=uri), "t")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "trainer", "run", str(job)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:

        def second_epoch_committed():
            if proc.poll() is not None:  # died early: fail now, with its output
                raise AssertionError(f"torchrun exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            return store.exists("stage-01-top3/epoch-0001/manifest.json")

        wait_until(second_epoch_committed, 300, "stage 1 epoch 1", 0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers
        os.kill(int(max(workers, key=int)), signal.SIGKILL)  # the later-started worker: rank 1
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-2000:]
    assert ckpt.read_pointer(store, 1, "top3") is None, "the kill came too late: stage 1 had finished"
    assert ckpt.latest_valid(store, 1, "top3") is not None

    again = torchrun(2, "-m", "trainer", "run", str(job))
    assert "top3: resuming after epoch" in again.stdout
    got = _finals(uri)
    for want, have in zip(expected, got):
        assert _comparable(have) == _comparable(want)

    # Run again: nothing to do, and it says so.
    third = torchrun(2, "-m", "trainer", "run", str(job))
    assert "all requested stages already finished; nothing to do" in third.stdout


def test_a_final_checkpoint_that_cannot_commit_fails_the_process(small_job, tmp_path, s3_env, seaweed):
    small_job["spec"]["stages"] = [small_job["spec"]["stages"][1] | {"epochs": 3}]
    small_job["spec"]["checkpoint"] = {"uri": "s3://thaw/unreachable", "uploadTimeoutSeconds": 2}
    small_job["spec"]["metrics"] = {"enabled": False}
    job = write_job(tmp_path, small_job)
    cmd = [sys.executable, "-m", "trainer", "run", str(job)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:  # the first epoch is done and its checkpoint queued
            if '"event": "epoch"' in line:
                break
        seaweed.stop()
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        seaweed.start()
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stage top3: final checkpoint s3://thaw/unreachable/t/stage-00-top3/epoch-0002")
    assert "was not committed" in last and "gave up after" in last


def _series(
    prom: Prometheus, name: str, agg: str = "", fn: str = "last_over_time", labels: tuple = ("stage", "rank")
) -> dict[tuple, float]:
    """Label values (stage, rank by default) -> the last scraped value (the processes have exited: use the
    range, not staleness)."""
    expr = f"{fn}({name}[10m])"
    return {
        tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
        for r in prom.query(f"{agg} ({expr})" if agg else expr)
    }


def test_prometheus_scrapes_every_rank_with_sane_values(small_job, tmp_path, s3_env, seaweed):
    port = free_ports(1, offset=1)[0]
    prom = Prometheus(tmp_path / "prom", {"thaw-trainer": [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]}).start()
    try:
        small_job["spec"]["stages"][1]["epochs"] = 4
        small_job["spec"]["metrics"] = {"port": port, "lingerSeconds": 3}  # > the 1 s scrape interval
        small_job["spec"]["checkpoint"] = {"uri": "s3://thaw/metrics"}
        # A cosine floor at half the peak: each group's final rate is known and non-zero.
        small_job["spec"]["schedule"] = {"minLrFactor": 0.5}
        job = write_job(tmp_path, small_job)
        t0 = time.time()
        torchrun(2, "-m", "trainer", "run", str(job))
        stages = {"head", "top3"}
        for name in ("thaw_train_loss", "thaw_val_loss"):
            values = _series(prom, name)
            assert {s for s, _ in values} == stages and {r for _, r in values} == {"0", "1"}, (name, values)
            assert all(0 < v < 10 for v in values.values()), (name, values)
        acc = _series(prom, "thaw_val_accuracy_ratio")
        assert all(0 <= v <= 1 for v in acc.values()) and acc[("top3", "0")] > 0.2
        assert all(v > 0 for v in _series(prom, "thaw_images_per_second").values())
        steps = _series(prom, "thaw_step_duration_seconds_count")
        assert steps[("top3", "0")] == steps[("top3", "1")] > 0  # DDP: both ranks take every step
        assert all(v >= 0 for v in _series(prom, "thaw_data_wait_seconds_sum").values())
        trainable, total = _series(prom, "thaw_trainable_parameters"), _series(prom, "thaw_parameters")
        assert 0 < trainable[("head", "0")] < trainable[("top3", "0")] < total[("top3", "0")]
        # Per layer group, the last value each rank exported (it lingers past a scrape) is the rate the
        # trainer recorded for the stage's last epoch: timing-free, unlike a peak a scrape may miss.
        # The rate recorded is the one the epoch's last step trained at (the cosine one step before
        # its floor), not the schedule's value after that step.
        lrs = _series(prom, "thaw_learning_rate", labels=("stage", "rank", "group"))
        last = {}
        for (stage, peak), final in zip((("head", 0.05), ("top3", 0.01)), _finals("s3://thaw/metrics")):
            recorded = final["history"][-1]["lr"]
            for rank in ("0", "1"):
                got = {g: v for (s, r, g), v in lrs.items() if (s, r) == (stage, rank)}
                assert got == pytest.approx(recorded), (stage, rank, got, recorded)
            total = int(steps[(stage, "0")])
            last[stage] = peak * lr_factor(total - 1, total, 0, ScheduleSpec(min_lr_factor=0.5))
            assert 0.5 * peak < last[stage] < 0.6 * peak
            assert max(recorded.values()) == pytest.approx(last[stage]), recorded
        top3 = sorted(v for (s, r, _), v in lrs.items() if (s, r) == ("top3", "0"))
        rates = [last["top3"] / 2.6**2, last["top3"] / 2.6, last["top3"]]
        assert len(top3) == 3 and top3 == pytest.approx(rates), top3  # lrDecay
        assert _series(prom, "thaw_epoch")[("top3", "1")] == 4
        assert _series(prom, "thaw_checkpoint_upload_bytes_total")[("top3", "0")] > 100_000
        assert t0 <= _series(prom, "thaw_checkpoint_last_success_timestamp_seconds")[("top3", "0")] <= time.time()
        assert _series(prom, "thaw_checkpoint_save_seconds_count")[("top3", "0")] == 4
        assert _series(prom, "thaw_job_stages")[("", "")] == 2
        assert _series(prom, "thaw_job_progress_ratio")[("", "")] == 1
    finally:
        prom.stop()


def test_sigterm_commits_queued_checkpoints_then_exits_143_and_a_rerun_resumes(small_job, tmp_path, s3_env, seaweed):
    small_job["spec"]["stages"] = [small_job["spec"]["stages"][1] | {"epochs": 6}]
    small_job["spec"]["checkpoint"] = {"uri": "s3://thaw/sigterm"}
    small_job["spec"]["metrics"] = {"enabled": False}
    job = write_job(tmp_path, small_job)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "run", str(job)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stdout:
            if '"event": "epoch"' in line:  # epoch 0 done, its checkpoint queued
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err
    store = open_store(CheckpointSpec(uri="s3://thaw/sigterm"), "t")
    prefix, manifest = ckpt.latest_valid(store, 0, "top3")
    assert manifest["epoch"] >= 0 and ckpt.read_pointer(store, 0, "top3") is None
    again = run([sys.executable, "-m", "trainer", "run", str(job)])
    assert f"resuming after epoch {manifest['epoch'] + 1}" in again.stdout
    assert ckpt.read_pointer(store, 0, "top3")["metrics"]["epochs_run"] == 6
