"""The checkpoint writer's retry, snapshot and failure logic, against an in-memory store."""

from __future__ import annotations

import pytest
import torch

from thaw_contract.spec import CheckpointSpec
from trainer import checkpoint as ckpt
from trainer.storage import MissingObject, StoreError
from trainer.uploader import CheckpointWriter, backoff_seconds, retrying


class MemoryStore:
    """A dict with a switch: while `down`, every call fails like an unreachable server."""

    uri = "mem://job"

    def __init__(self, fail_puts: int = 0):
        self.objects: dict[str, bytes] = {}
        self.fail_puts = fail_puts
        self.down = False

    def _check(self):
        if self.down:
            raise StoreError("mem://job: cannot write: connection refused", transient=True)

    def put(self, key, data):
        self._check()
        if self.fail_puts:
            self.fail_puts -= 1
            raise StoreError("mem://job: cannot write: 503", transient=True)
        self.objects[key] = data

    def get(self, key):
        self._check()
        if key not in self.objects:
            raise MissingObject(f"mem://job/{key}: no such object")
        return self.objects[key]

    def exists(self, key):
        return key in self.objects

    def list(self, prefix):
        return sorted(k for k in self.objects if k.startswith(prefix.rstrip("/") + "/"))

    def delete(self, keys):
        for k in keys:
            self.objects.pop(k, None)


class Counting:
    def __init__(self):
        self.failures = self.uploads = 0
        self.blocked = []

    def upload_failed(self):
        self.failures += 1

    def upload_done(self, seconds, size):
        self.uploads += 1

    def checkpoint_blocked(self, seconds):
        self.blocked.append(seconds)


def spec(asynchronous: bool, timeout: float) -> CheckpointSpec:
    return CheckpointSpec(asynchronous=asynchronous, upload_timeout_seconds=timeout)


def test_the_writer_takes_its_defaults_from_the_spec():
    writer = CheckpointWriter(MemoryStore())
    default = CheckpointSpec()
    assert (writer.asynchronous, writer.timeout_seconds, writer._queue.maxsize) == (
        default.asynchronous,
        default.upload_timeout_seconds,
        default.max_pending,
    )


def test_backoff_doubles_and_is_capped():
    assert [backoff_seconds(a, jitter=0) for a in (1, 2, 3, 4)] == [0.5, 1, 2, 4]
    assert backoff_seconds(20, jitter=0) == backoff_seconds(10**6, jitter=0) == 30
    assert all(0.45 <= backoff_seconds(1) <= 0.55 for _ in range(100))


def test_retrying_gives_up_at_the_deadline_with_the_last_error():
    sleeps = []
    calls = []

    def fail():
        calls.append(1)
        raise StoreError("s3://b/k: cannot write: connection refused", transient=True)

    with pytest.raises(StoreError, match=r"connection refused \(gave up after \d+ attempts in 0.1s\)"):
        retrying(fail, 0.1, "x", sleep=sleeps.append)
    assert len(calls) == len(sleeps) + 1


@pytest.mark.parametrize("asynchronous", [True, False])
def test_failed_attempts_are_retried_and_counted_then_committed(asynchronous):
    store, metrics = MemoryStore(fail_puts=3), Counting()
    writer = CheckpointWriter(store, spec(asynchronous, 60), metrics=metrics, sleep=lambda s: None)
    done = []
    writer.save("stage-00-a/epoch-0000", {"model.pt": {"w": torch.ones(3)}}, {"epoch": 0}, done.append)
    writer.flush()
    writer.close()
    assert metrics.failures == 3 and metrics.uploads == 1 and len(metrics.blocked) == 1
    assert ckpt.verify(store, "stage-00-a/epoch-0000")["epoch"] == 0
    assert done and done[0]["files"]["model.pt"]["size"] > 0
    assert "stage-00-a/epoch-0000" in writer.committed and "stage-00-a/epoch-0000" in writer.trusted


def test_the_snapshot_is_taken_at_save_time():
    store = MemoryStore()
    store.down = True
    writer = CheckpointWriter(store, spec(True, 60), sleep=lambda s: None)
    w = torch.zeros(4)
    writer.save("stage-00-a/epoch-0000", {"model.pt": {"w": w}}, {"epoch": 0})
    w.add_(1)  # training goes on and changes the weights before the upload happens
    store.down = False
    writer.flush()
    writer.close()
    torch.testing.assert_close(ckpt.load_object(store, "stage-00-a/epoch-0000", "model.pt")["w"], torch.zeros(4))


def test_an_upload_past_its_deadline_is_reported_and_leaves_no_manifest():
    store = MemoryStore()
    store.down = True
    writer = CheckpointWriter(store, spec(True, 0.05), sleep=lambda s: None)
    writer.save("stage-00-a/epoch-0000", {"model.pt": {"w": torch.ones(1)}}, {"epoch": 0})
    writer.flush()
    writer.close()
    assert "gave up after" in writer.failed["stage-00-a/epoch-0000"]
    assert not store.exists("stage-00-a/epoch-0000/manifest.json")


def _commit(store, epoch):
    blobs = ckpt.encode({"model.pt": {"w": torch.ones(1)}})
    ckpt.commit(store, ckpt.epoch_prefix(0, "a", epoch), blobs, {"epoch": epoch})


def test_retention_never_deletes_a_valid_checkpoint_for_a_failed_newer_one():
    store = MemoryStore()
    for e in range(3):
        _commit(store, e)
    # Epoch 3's objects landed but its manifest did not (the store went away).
    store.put("stage-00-a/epoch-0003/model.pt", b"half")
    deleted = ckpt.prune(store, 0, "a", keep_last=2, keep=set(), upto="stage-00-a/epoch-0003")
    assert deleted == ["stage-00-a/epoch-0000"]
    assert [int(d.rsplit("-", 1)[1]) for d in ckpt.epoch_dirs(store, 0, "a")] == [1, 2, 3]
    assert ckpt.latest_valid(store, 0, "a")[0] == "stage-00-a/epoch-0002"


def test_retention_keeps_the_best_and_deletes_manifests_first():
    store = MemoryStore()
    for e in range(5):
        _commit(store, e)
    order = []
    real_delete = store.delete
    store.delete = lambda keys: (order.extend(keys), real_delete(keys))
    ckpt.prune(store, 0, "a", keep_last=2, keep={"stage-00-a/epoch-0001"})
    assert [int(d.rsplit("-", 1)[1]) for d in ckpt.epoch_dirs(store, 0, "a")] == [1, 3, 4]
    assert order[0] == "stage-00-a/epoch-0000/manifest.json"


def test_a_transient_store_error_is_not_mistaken_for_a_damaged_checkpoint():
    store = MemoryStore()
    _commit(store, 0)
    store.down = True
    with pytest.raises(StoreError, match="connection refused"):
        ckpt.verify(store, "stage-00-a/epoch-0000")
