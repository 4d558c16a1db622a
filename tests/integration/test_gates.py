"""Gates and the divergence guard with real training, one process and stage by stage (the path
a stage pod runs): the weights a regressing stage passes on are its input's, bit for bit."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.integration.conftest import ROOT, run, write_job
from trainer.checkpoint import FINAL, stage_prefix

pytestmark = pytest.mark.integration
PY = sys.executable


def _pointers(store, names=("head", "top3")):
    return [json.loads((store / "t" / stage_prefix(k, n) / FINAL).read_text()) for k, n in enumerate(names)]


def test_a_stage_that_does_not_gain_enough_is_rolled_back_the_same_both_ways(tmp_path, small_job):
    small_job["spec"]["stages"][1]["gate"] = {"minGain": 0.5}  # no stage gains 50 points: a sure regression
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out = run([PY, "-m", "trainer", "run", str(write_job(a, json.loads(json.dumps(small_job))))]).stdout
    assert "top3: rolled back (val_accuracy" in out and "the next stage starts from its input" in out
    head, top3 = _pointers(a / "store")
    assert top3["checkpoint"] == head["checkpoint"]  # what stage 2 would load: stage 0's weights
    assert top3["metrics"]["weights_sha256"] == head["metrics"]["weights_sha256"]
    assert top3["metrics"]["test_accuracy"] == head["metrics"]["test_accuracy"]
    gate = top3["metrics"]["gate"]
    assert gate["decision"] == "rolled_back" and gate["previous"] == head["metrics"]["gate"]["value"]
    assert gate["carried"] == head["metrics"]["gate"]["carried"]
    report = run([PY, "-m", "trainer", "report", str(a / "job.yaml")]).stdout
    assert report.splitlines()[3].rstrip().endswith("rolled back")

    job_b = write_job(b, json.loads(json.dumps(small_job)))
    for k in (0, 1):  # as stage pods run it
        run([PY, "-m", "trainer", "run", str(job_b), "--stage", str(k)])
    assert [p["metrics"]["weights_sha256"] for p in _pointers(b / "store")] == [
        p["metrics"]["weights_sha256"] for p in (head, top3)
    ]


def test_keep_goes_on_with_the_worse_stage_and_fail_stops_with_one_line(tmp_path, small_job):
    small_job["spec"]["gate"] = {"minGain": 0.5, "onRegression": "keep"}
    out = run([PY, "-m", "trainer", "run", str(write_job(tmp_path, json.loads(json.dumps(small_job))))]).stdout
    assert "top3: worse than the stage before" in out
    head, top3 = _pointers(tmp_path / "store")
    assert top3["checkpoint"] != head["checkpoint"] and top3["metrics"]["gate"]["decision"] == "kept"

    small_job["spec"]["gate"]["onRegression"] = "fail"
    failing = tmp_path / "fail"
    failing.mkdir()
    proc = subprocess.run(
        [PY, "-m", "trainer", "run", str(write_job(failing, small_job))], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: stage gate: val_accuracy") and line.endswith("spec.gate.onRegression is fail")
    assert not (failing / "store" / "t" / stage_prefix(1, "top3") / FINAL).exists()  # nothing committed


def test_stop_ends_the_job_after_the_stage_that_did_not_gain_the_same_both_ways(tmp_path, small_job):
    """onRegression: stop: the stage is rolled back, the job ends there (exit 0), and no later
    stage trains: not in the same process, not on a rerun, not in a pod started for it."""
    small_job["spec"]["stages"].append({"name": "again", "trainable": {"top": 1}, "epochs": 1, "lr": 0.01})
    small_job["spec"]["stages"][1]["gate"] = {"minGain": 0.5, "onRegression": "stop"}  # a sure regression
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    job_a = write_job(a, json.loads(json.dumps(small_job)))
    out = run([PY, "-m", "trainer", "run", str(job_a)]).stdout
    assert "top3: rolled back (val_accuracy" in out and "the job ends with its input (gate: stop)" in out
    assert "top3 ended the job (spec.gate.onRegression: stop); skipped: again" in out
    head, top3 = _pointers(a / "store")
    assert top3["checkpoint"] == head["checkpoint"] and top3["metrics"]["gate"]["decision"] == "stopped"
    assert not (a / "store" / "t" / stage_prefix(2, "again")).exists()  # it never started
    model = json.loads((a / "store" / "t" / "model" / "config.json").read_text())  # the job's model: top3's input
    assert model["from"]["name"] == "top3" and model["from"]["checkpoint"].endswith(head["checkpoint"])
    assert top3["metrics"]["model"]["sha256"] == model["weightsSha256"]
    rerun = run([PY, "-m", "trainer", "run", str(job_a)]).stdout
    assert "skipped: again" in rerun and "nothing to do" in rerun
    report = run([PY, "-m", "trainer", "report", str(job_a)]).stdout
    assert report.splitlines()[3].rstrip().endswith("rolled back; job stopped")

    job_b = write_job(b, json.loads(json.dumps(small_job)))
    for k in (0, 1, 2):  # as stage pods run it; stage 2's pod finds the job ended and trains nothing
        last = run([PY, "-m", "trainer", "run", str(job_b), "--stage", str(k)]).stdout
    assert "top3 ended the job (spec.gate.onRegression: stop); skipped: again" in last
    assert not (b / "store" / "t" / stage_prefix(2, "again")).exists()
    assert [p["metrics"]["weights_sha256"] for p in _pointers(b / "store")] == [
        p["metrics"]["weights_sha256"] for p in (head, top3)
    ]


def test_a_diverging_stage_stops_and_what_it_passes_on_is_its_input(tmp_path, small_job):
    small_job["spec"]["stages"][1].update(trainable="all", lr=1e6)  # SGD at a million: the loss explodes
    out = run([PY, "-m", "trainer", "run", str(write_job(tmp_path, small_job))]).stdout
    assert "top3: diverged (loss" in out
    head, top3 = _pointers(tmp_path / "store")
    assert top3["metrics"]["diverged"].startswith("loss ")
    assert top3["metrics"]["gate"]["decision"] == "rolled_back"
    assert top3["checkpoint"] == head["checkpoint"]


def test_a_first_stage_that_diverges_fails_with_one_line_naming_its_lr(tmp_path, small_job):
    small_job["spec"]["stages"][0].update(trainable="all", lr=1e6)
    proc = subprocess.run(
        [PY, "-m", "trainer", "run", str(write_job(tmp_path, small_job))], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: stage head diverged before its first epoch ended (loss ")
    assert line.endswith("lower spec.stages[0].lr")


def test_a_collapse_to_one_class_is_rolled_back_later_and_reported_in_a_first_stage(tmp_path, small_job):
    """Issue 26's blind spot: SGD at 0.5 over the whole network sends every image to one class
    with finite losses (the divergence guard is off here, so only the collapse check can see it).
    A later stage that collapses is rolled back; a first stage has nothing to roll back to, so
    its result says so, and the report's gate column."""
    small_job["spec"]["divergence"] = {"enabled": False}
    small_job["spec"]["stages"][1].update(trainable="all", lr=0.5, lrDecay=1)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    out = run([PY, "-m", "trainer", "run", str(write_job(a, json.loads(json.dumps(small_job))))]).stdout
    assert "warning: top3: epoch 1 predicts class " in out and "collapsed to a constant prediction" in out
    head, top3 = _pointers(a / "store")
    gate = top3["metrics"]["gate"]
    assert gate["decision"] == "rolled_back" and gate["reason"].startswith("it predicts class ")
    assert top3["checkpoint"] == head["checkpoint"] and top3["metrics"].get("collapsed") is None

    small_job["spec"]["stages"] = [small_job["spec"]["stages"][1]]
    job = write_job(b, small_job)
    out = run([PY, "-m", "trainer", "run", str(job)]).stdout
    assert "warning: top3: its final weights predict class " in out, out[-3000:]
    (only,) = _pointers(b / "store", ("top3",))
    assert only["metrics"]["collapsed"].endswith("collapsed to a constant prediction")
    assert only["metrics"]["gate"]["decision"] == "first"
    report = run([PY, "-m", "trainer", "report", str(job)]).stdout
    assert report.splitlines()[2].rstrip().endswith("(collapsed: predicts one class)")


def test_lr_auto_picks_a_rate_once_and_a_retried_stage_trains_the_same(tmp_path, small_job):
    small_job["spec"]["stages"][1].update(lr="auto", lrDecay=2.6)
    job = write_job(tmp_path, small_job)
    out = run([PY, "-m", "trainer", "run", str(job)]).stdout
    stage_dir = tmp_path / "store/t" / stage_prefix(1, "top3")
    found = json.loads((stage_dir / "lr_find.json").read_text())
    assert f"top3: lr auto -> {found['lr']:.3g} (range test: " in out
    assert (stage_dir / "lr_find.png").stat().st_size > 5_000
    assert 1e-7 < found["lr"] < 10 and len(found["lrs"]) == len(found["losses"])
    _, top3 = _pointers(tmp_path / "store")
    assert top3["metrics"]["lr_found"] == found["lr"]
    # A retried pod after the range test ran (its result stored, nothing else): the stored rate,
    # no second test, and the same weights as the process that ran the test (streams untouched).
    for p in stage_dir.iterdir():
        if p.name != "lr_find.json":
            subprocess.run(["rm", "-rf", str(p)], check=True)
    again = run([PY, "-m", "trainer", "run", str(job), "--stage", "1"]).stdout
    assert f"top3: lr auto -> {found['lr']:.3g}" in again and not (stage_dir / "lr_find.png").exists()
    assert _pointers(tmp_path / "store")[1]["metrics"]["weights_sha256"] == top3["metrics"]["weights_sha256"]


def test_the_default_gate_compares_both_models_image_by_image_on_the_validation_set(tmp_path, small_job):
    """The paired test's counts come from the two models' answers on the same images: the images
    the stage got right and its input got wrong, less the reverse, are exactly the accuracy gain."""
    out = run([PY, "-m", "trainer", "run", str(write_job(tmp_path, small_job))]).stdout
    head, top3 = _pointers(tmp_path / "store")
    gate = top3["metrics"]["gate"]
    images = small_job["spec"]["data"]["valPerClass"] * small_job["spec"]["model"]["numClasses"]
    words = re.fullmatch(
        rf"(.*; )?on the same {images} images: worse on (\d+), better on (\d+), McNemar p ([0-9.e-]+)( < 0.05)?",
        gate["reason"],
    )
    assert words, gate["reason"]
    worse, better, p = int(words[2]), int(words[3]), float(words[4])
    assert (better - worse) / images == pytest.approx(gate["value"] - gate["previous"], abs=1e-9)
    assert p == pytest.approx(gate["p"], rel=1e-2) and (gate["decision"] == "advanced") == (gate["p"] >= 0.05)
    assert top3["metrics"]["best_val_accuracy"] == gate["value"]  # the report shows what the gate compared
    assert gate["previous"] == pytest.approx(head["metrics"]["gate"]["value"], abs=1.5 / images)
    if gate["decision"] == "advanced":
        assert f"top3: advances ({gate['reason']})" in out
