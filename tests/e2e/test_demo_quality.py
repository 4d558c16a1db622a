"""The demo job, exactly as `make demo-local` runs it (torchrun, 2 gloo processes), and the claim
it exists to show: staged fine-tuning from ImageNet weights beats the same network from
random init under the same epoch budget, and a logistic regression on raw pixels of the
same few-shot subset."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.baselines import logistic_regression_accuracy
from tests.integration.conftest import ROOT, run, torchrun
from trainer.checkpoint import FINAL, stage_prefix

pytestmark = pytest.mark.e2e
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
# Measured on this job, means over seeds 0-2 (docs/results.md): staged 0.8355 (with gates), logistic
# regression 0.802, from scratch 0.785. Margins are about half the measured gaps.
MARGIN_OVER_LOGREG = 0.02
MARGIN_OVER_SCRATCH = 0.025
SEEDS = (0, 1, 2)


def _final_test_accuracy(store, name, stages):
    rows = [
        json.loads((store / name / stage_prefix(i, s) / FINAL).read_text())["metrics"] for i, s in enumerate(stages)
    ]
    return rows[-1]["test_accuracy"], rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    doc = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"]["checkpoint"]["uri"] = f"file://{tmp}/store"
    path = tmp / "quickstart.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = torchrun(2, "-m", "trainer", "run", str(path), timeout=1200)
    return tmp, doc, proc


def test_demo_runs_every_stage_and_reports(demo_run):
    tmp, doc, proc = demo_run
    names = [s["name"] for s in doc["spec"]["stages"]]
    _, rows = _final_test_accuracy(tmp / "store", "quickstart", names)
    assert [r["name"] for r in rows] == names
    assert rows[0]["feature_cache"] is True, "the head stage trains on cached features"
    for name in names:
        assert name in proc.stdout
    assert "val acc" in proc.stdout and "curves:" in proc.stdout
    assert (tmp / "store" / "quickstart" / "curves.png").stat().st_size > 10_000
    epochs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "epoch"')]
    assert {e["stage"] for e in epochs} == set(names)
    assert all({"train_loss", "val_accuracy", "lr", "images_per_second"} <= e.keys() for e in epochs)


_logreg = logistic_regression_accuracy


def _run_job(doc: dict, tmp_path, name: str, nproc: int) -> float:
    return _run_stages(doc, tmp_path, name, nproc)[0]


def _run_stages(doc: dict, tmp_path, name: str, nproc: int) -> tuple[float, list[dict]]:
    doc = json.loads(json.dumps(doc))
    doc["metadata"]["name"] = name
    doc["spec"]["checkpoint"]["uri"] = f"file://{tmp_path}/store"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    if nproc > 1:
        torchrun(nproc, "-m", "trainer", "run", str(path), timeout=1200)
    else:
        run([sys.executable, "-m", "trainer", "run", str(path)], timeout=1800, OMP_NUM_THREADS="2")
    stages = [s["name"] for s in doc["spec"]["stages"]]
    return _final_test_accuracy(tmp_path / "store", name, stages)


def _scratch(doc: dict) -> dict:
    """The same network from random init, every layer trained for the same total epochs."""
    total_epochs = sum(s["epochs"] for s in doc["spec"]["stages"])
    scratch = json.loads(json.dumps(doc))
    scratch["spec"]["model"]["weights"] = None
    # No early stopping: from random init the bundled model's slow BatchNorm momentum (0.01)
    # leaves eval-mode accuracy at chance for the first epochs, which would stop it unfairly.
    scratch["spec"]["earlyStopping"] = None
    # lr 0.02 with a one-epoch warmup was the best of the rates tried from scratch (docs/results.md).
    scratch["spec"]["stages"] = [
        {
            "name": "all",
            "trainable": "all",
            "epochs": total_epochs,
            "lr": 0.02,
            "schedule": {"name": "cosine", "warmupEpochs": 1},
        }
    ]
    return scratch


def test_staged_beats_logistic_regression_and_scratch_over_seeds(demo_run, tmp_path):
    """Single runs differ by up to ~3 points (seed, thread count, kernel choice), so compare
    means over three seeds; each seed draws its own 1,000-image subset, shared by all methods."""
    tmp, doc, _ = demo_run
    names = [s["name"] for s in doc["spec"]["stages"]]
    staged, head, decisions, scratch, logreg = [], [], [], [], []
    for seed in SEEDS:
        d = json.loads(json.dumps(doc))
        d["spec"]["seed"] = seed
        if seed == doc["spec"]["seed"]:
            final, rows = _final_test_accuracy(tmp / "store", "quickstart", names)
        else:
            final, rows = _run_stages(d, tmp_path, f"staged-{seed}", nproc=2)
        staged.append(final)
        head.append(rows[0]["test_accuracy"])
        decisions.append([(r.get("gate") or {}).get("decision") for r in rows[1:]])
        scratch.append(_run_job(_scratch(d), tmp_path, f"scratch-{seed}", nproc=2))
        logreg.append(_logreg(d))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(
        f"seeds {SEEDS}: staged {staged} mean {mean(staged):.4f} (gates {decisions}); head only {head}; "
        f"logistic regression {logreg} "
        f"mean {mean(logreg):.4f}; from scratch {scratch} mean {mean(scratch):.4f}"
    )
    # The method itself: unfreezing, with the gate on, beats the linear probe it starts from on
    # every seed (a demo whose unfreezing stages are all rolled back would show nothing).
    assert all(s > h for s, h in zip(staged, head)), f"staged {staged} against its head-only stage {head}"
    assert mean(staged) > mean(logreg) + MARGIN_OVER_LOGREG
    assert mean(staged) > mean(scratch) + MARGIN_OVER_SCRATCH
