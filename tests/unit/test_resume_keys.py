"""What decides whether a checkpoint may be resumed from, and what a dataset mirror fetches."""

from __future__ import annotations

from tests.builders import job_doc, with_path
from thaw_contract.spec import parse_job, training_hash
from trainer.datasync import INDEX, cache_path, plan_sync, unsafe_key


def _hash(doc) -> str:
    return training_hash(parse_job(doc).spec)


def test_training_hash_ignores_operational_fields():
    base = _hash(job_doc())
    for path, value in [
        ("spec.image", "registry/thaw:2"),
        ("spec.nodes", 4),
        ("spec.suspend", True),
        ("spec.data.workers", 4),
        ("spec.metrics", {"port": 9500}),
        ("spec.checkpoint", {"uri": "s3://bucket/x", "keepLast": 5}),
        ("spec.speed", {"threads": 3}),
    ]:
        assert _hash(with_path(job_doc(), path, value)) == base, path


def test_training_hash_changes_with_what_training_computes():
    base = _hash(job_doc())
    for path, value in [
        ("spec.seed", 1),
        ("spec.stages.0.lr", 0.5),
        ("spec.data.imageSize", 48),
        ("spec.data.batchSize", 64),
        ("spec.model.numClasses", 11),
    ]:
        assert _hash(with_path(job_doc(), path, value)) != base, path


def test_a_new_unset_field_keeps_older_checkpoints_digest():
    """A job resumed across an upgrade must find its checkpoints: the digest of a gradual job
    written before gradual.epochs existed (computed at 4acc092) is unchanged."""
    doc = with_path(job_doc(gradual={"stages": 3, "epochsPerStage": 4}), "spec.stages", "DELETE")
    assert _hash(doc) == "03d8690d0f68d016"
    total = with_path(with_path(doc, "spec.gradual.epochsPerStage", "DELETE"), "spec.gradual.epochs", 12)
    assert _hash(total) != _hash(doc)


def test_sync_plan_fetches_changed_and_new_and_drops_removed():
    remote = {"a": (1, "e1"), "b": (2, "e2"), "c": (3, "e3")}
    local = {"a": (1, "e1"), "b": (2, "old"), "d": (4, "e4")}
    assert plan_sync(remote, local) == (["b", "c"], ["d"])
    assert plan_sync(remote, remote) == ([], [])


def test_cache_path_is_stable_and_distinct_per_prefix():
    a = cache_path("/cache", "s3://data/set/a")
    assert a == cache_path("/cache", "s3://data/set/a")
    assert a != cache_path("/cache", "s3://data/set_a")
    assert str(a).startswith("/cache/s3/data-set_a-")


def test_object_keys_that_would_leave_the_mirror_or_hit_its_own_files_are_refused():
    for key in ("train/c0/a.jpg", "a.jpg", "train/..c/a.jpg", "train/c0/..jpg"):
        assert unsafe_key(key) is None, key
    for key in ("../etc/passwd", "train/../../x", "/abs/x.jpg", "train//x.jpg", "train/c0/..", "a\0b"):
        assert unsafe_key(key) == "it would land outside the data cache", key
    for key in (INDEX, "train/c0/.tmp-a.jpg"):
        assert unsafe_key(key) == "its name is one the sync uses for its own files", key
