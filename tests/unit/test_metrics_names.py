"""Trainer metric names and labels follow Prometheus conventions; cardinality stays bounded."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from trainer.metrics import TrainerMetrics


def _families(m: TrainerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def _exercise(rank: int) -> TrainerMetrics:
    m = TrainerMetrics("job-a", rank)
    m.job_plan([2, 3], world=2)
    for index, name, epochs in ((0, "head", 2), (1, "all", 3)):
        m.start_stage(index, name, trainable=10, total=100, epochs=epochs, steps=4)
        for e in range(epochs):
            for _ in range(4):
                m.step(0.1, 0.01, 32, {"head": 0.1, "layer4": 0.01})
            row = {
                "train_loss": 1.0,
                "train_accuracy": 0.5,
                "val_loss": 1.1,
                "val_accuracy": 0.4,
                "epoch": e,
                "eta_seconds": 3.0,
            }
            m.end_epoch(row, {"head": 0.1}, 320.0, (e + 1) * 4)
            m.checkpoint_blocked(0.01)
            m.upload_done(0.5, 1000)
        m.end_stage(epochs)
    return m


def test_names_have_units_counters_total_and_only_bounded_labels():
    fams = _families(_exercise(0))
    for name, fam in fams.items():
        assert name.startswith("thaw_"), name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), name
        for s in fam.samples:
            extra = set(s.labels) - {"finetunejob", "stage", "rank", "group", "le"}
            assert not extra, (name, extra)
    assert {"thaw_step_duration_seconds", "thaw_data_wait_seconds", "thaw_checkpoint_upload_seconds"} <= set(fams)
    assert fams["thaw_checkpoint_upload_bytes"].type == "counter"


def test_values_per_stage_and_job_progress():
    fams = _families(_exercise(0))
    value = lambda fam, **labels: next(
        s.value for s in fams[fam].samples if all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert value("thaw_train_images", stage="all", rank="0") == 3 * 4 * 32
    assert value("thaw_epoch", stage="head") == 2 and value("thaw_epoch", stage="all") == 3
    assert value("thaw_step", stage="all") == 12
    assert value("thaw_job_progress_ratio", finetunejob="job-a") == 1.0
    assert value("thaw_job_stages", finetunejob="job-a") == 2
    assert value("thaw_checkpoint_upload_bytes", stage="all") == 3000


def test_only_rank_zero_exports_job_level_series():
    fams = _families(_exercise(1))
    assert not [s for s in fams["thaw_job_progress_ratio"].samples]
    assert not [s for s in fams["thaw_job_stages"].samples]
