"""The s3:// store, checkpoints and uploads against a real SeaweedFS."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch

from testbed.seaweedfs import ADMIN, READER
from thaw_contract.spec import CheckpointSpec, SpecError
from trainer import checkpoint as ckpt
from trainer.datasync import sync_prefix
from trainer.storage import MissingObject, S3Store, open_store
from trainer.uploader import CheckpointWriter

pytestmark = pytest.mark.integration


def _store(s3_env, name: str) -> S3Store:
    return open_store(CheckpointSpec(uri="s3://thaw/tests"), name)


def test_objects_round_trip_multipart_list_and_delete(s3_env, seaweed):
    store = _store(s3_env, "roundtrip")
    big = os.urandom(40 * 1024 * 1024 + 123)  # above the 16 MiB multipart threshold: 3 parts
    store.put("a/big.bin", big)
    store.put("a/b/small", b"x")
    assert store.get("a/big.bin") == big
    assert store.list("a") == ["a/b/small", "a/big.bin"]
    assert store.exists("a/b/small") and not store.exists("a/none")
    with pytest.raises(MissingObject, match="s3://thaw/tests/roundtrip/a/none: no such object"):
        store.get("a/none")
    store.delete(["a/big.bin", "a/b/small"])
    assert store.list("a") == []


@pytest.mark.parametrize(
    "case,uri,identity,expected",
    [
        (
            "missing bucket",
            "s3://no-such-bucket/x",
            ADMIN,
            "cannot open bucket: bucket 'no-such-bucket' does not exist",
        ),
        ("wrong secret", "s3://thaw/x", (ADMIN[0], "wrong"), "credentials rejected"),
        ("unknown key", "s3://thaw/x", ("nobody", "wrong"), "credentials rejected"),
        ("read-only credentials", "s3://thaw/x", READER, "cannot write: access denied"),
    ],
)
def test_store_problems_are_one_line_naming_the_field(seaweed, monkeypatch, case, uri, identity, expected):
    sentinel = S3Store("s3://thaw/x/job", seaweed.client())
    sentinel.put("keep/me", b"precious")
    for k, v in seaweed.env(identity).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SpecError) as err:
        open_store(CheckpointSpec(uri=uri), "job")
    message = str(err.value)
    assert message.startswith("spec.checkpoint.uri: s3://") and expected in message, message
    assert "\n" not in message and identity[1] not in message
    assert sentinel.get("keep/me") == b"precious"  # nothing existing touched


def test_an_unreachable_store_is_waited_for_then_transient_not_a_configuration_error(monkeypatch):
    from trainer.storage import StoreError

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    spec = CheckpointSpec(uri="s3://thaw/x", endpoint="http://127.0.0.1:9", upload_timeout_seconds=2)
    with pytest.raises(StoreError) as err:
        open_store(spec, "job")
    assert err.value.transient and "gave up after" in str(err.value)


def _commit_epochs(store, n):
    for e in range(n):
        blobs = ckpt.encode({"model.pt": {"w": torch.full((4,), float(e))}})
        ckpt.commit(store, ckpt.epoch_prefix(0, "head", e), blobs, {"epoch": e})


def test_readers_skip_damaged_checkpoints_and_take_the_newest_valid(s3_env, seaweed, caplog):
    store = _store(s3_env, "damage")
    _commit_epochs(store, 3)
    client, key = seaweed.client(), "tests/damage/stage-00-head/epoch-0002/model.pt"
    client.put_object(Bucket="thaw", Key=key, Body=b"corrupt")  # same name, other bytes
    with caplog.at_level(logging.WARNING):
        prefix, manifest = ckpt.latest_valid(store, 0, "head")
    assert prefix.endswith("epoch-0001") and manifest["epoch"] == 1
    assert "stage-00-head/epoch-0002" in caplog.text
    client.delete_object(Bucket="thaw", Key="tests/damage/stage-00-head/epoch-0001/manifest.json")
    assert ckpt.latest_valid(store, 0, "head")[0].endswith("epoch-0000")
    # Retention counts only checkpoints that verify: the two damaged ones never push out epoch 0.
    assert ckpt.prune(store, 0, "head", keep_last=1, keep=set()) == []
    assert ckpt.latest_valid(store, 0, "head")[0].endswith("epoch-0000")


def test_uploads_retry_while_the_server_is_down_and_commit_when_it_returns(s3_env, seaweed):
    store = _store(s3_env, "outage")
    writer = CheckpointWriter(store, CheckpointSpec(asynchronous=True, upload_timeout_seconds=120))
    seaweed.stop()
    try:
        writer.save("stage-00-head/epoch-0000", {"model.pt": {"w": torch.ones(1000)}}, {"epoch": 0})
        # Back with the store down, neither committed nor given up: it did not wait on the upload.
        assert not writer.committed and not writer.failed
        time.sleep(3)  # retries against the dead server meanwhile
        assert not writer.committed
    finally:
        seaweed.start()
    writer.flush()
    assert "stage-00-head/epoch-0000" in writer.committed and not writer.failed
    assert ckpt.verify(store, "stage-00-head/epoch-0000")["epoch"] == 0
    writer.close()


def test_an_upload_that_cannot_commit_in_time_is_reported(s3_env, seaweed):
    store = _store(s3_env, "giveup")
    writer = CheckpointWriter(store, CheckpointSpec(asynchronous=True, upload_timeout_seconds=2))
    seaweed.stop()
    try:
        writer.save("stage-00-head/epoch-0000", {"model.pt": {"w": torch.ones(10)}}, {"epoch": 0})
        writer.flush()
    finally:
        seaweed.start()
    assert "gave up after" in writer.failed["stage-00-head/epoch-0000"]
    assert ckpt.latest_valid(store, 0, "head") is None


def test_dataset_prefix_is_downloaded_once_and_kept_in_sync(s3_env, seaweed, tmp_path):
    client = seaweed.client()
    for i in range(3):
        client.put_object(Bucket="data", Key=f"set/train/c{i}/img.png", Body=bytes([i]) * 100)
    dest = tmp_path / "mirror"
    assert sync_prefix("s3://data/set", dest) == 3
    assert (dest / "train/c1/img.png").read_bytes() == bytes([1]) * 100
    assert sync_prefix("s3://data/set", dest) == 0  # unchanged prefix: nothing downloaded
    client.put_object(Bucket="data", Key="set/train/c1/img.png", Body=b"new")
    client.delete_object(Bucket="data", Key="set/train/c2/img.png")
    assert sync_prefix("s3://data/set", dest) == 1
    assert (dest / "train/c1/img.png").read_bytes() == b"new"
    assert not (dest / "train/c2/img.png").exists()


def test_pods_sharing_a_cache_volume_fetch_a_prefix_once_between_them(s3_env, seaweed, tmp_path):
    """spec.dataCache: every stage pod mounts one volume. Syncs of the same prefix take turns
    under the cache lock (each opens it anew, as separate pods do); the later one downloads nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from trainer.datasync import cache_lock, cache_path

    client = seaweed.client()
    for i in range(60):
        client.put_object(Bucket="data", Key=f"shared/train/c{i % 3}/{i}.png", Body=bytes([i]) * 300)
    dest = cache_path(str(tmp_path / "volume"), "s3://data/shared")

    def pod(_: int) -> int:
        with cache_lock(dest):
            return sync_prefix("s3://data/shared", dest, threads=4)

    with ThreadPoolExecutor(3) as pool:
        assert sorted(pool.map(pod, range(3))) == [0, 0, 60]
    assert len(list(dest.rglob("*.png"))) == 60 and not list(dest.rglob(".tmp-*"))


def test_a_prefix_larger_than_the_cache_is_one_line_naming_the_cache_size_and_fetches_nothing(
    s3_env, seaweed, tmp_path, monkeypatch
):
    import shutil

    from trainer import datasync

    client = seaweed.client()
    for i in range(4):
        client.put_object(Bucket="data", Key=f"roomy/train/c0/{i}.png", Body=b"x" * 4000)
    dest = tmp_path / "mirror"
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(datasync.shutil, "disk_usage", lambda _p: real._replace(free=10_000))  # a 10 kB volume
    said = r"^spec\.dataCache\.size: s3://data/roomy needs 15\.6 KiB more in the data cache, which has 9\.8 KiB free"
    with pytest.raises(SpecError, match=said) as err:
        sync_prefix("s3://data/roomy", dest)
    assert "\n" not in str(err.value) and not list(tmp_path.rglob("*.png"))


def test_a_prefix_of_many_objects_is_fetched_in_parallel_and_an_interrupted_sync_keeps_what_it_finished(
    s3_env, seaweed, tmp_path, monkeypatch
):
    from trainer import datasync

    client = seaweed.client()
    keys = [f"many/train/c{i % 4}/img{i:03d}.jpg" for i in range(200)]
    for i, key in enumerate(keys):
        client.put_object(Bucket="data", Key=key, Body=i.to_bytes(2, "big") * 500)
    dest = tmp_path / "mirror"
    real, calls = datasync._fetch, []

    def failing_late(*args):
        calls.append(args[1])
        if len(calls) == 150:
            raise datasync.StoreError("injected: the link dropped")
        return real(*args)

    monkeypatch.setattr(datasync, "_fetch", failing_late)
    with pytest.raises(datasync.StoreError, match="injected"):
        sync_prefix("s3://data/many", dest, threads=8)
    monkeypatch.setattr(datasync, "_fetch", real)
    kept = len(json.loads((dest / datasync.INDEX).read_text()))
    assert 100 <= kept < 200  # what finished before the failure is indexed (the rest cancelled or failed)
    assert sync_prefix("s3://data/many", dest, threads=8) == 200 - kept  # only the rest, the second time
    for i, key in enumerate(keys):
        assert (dest / key.removeprefix("many/")).read_bytes() == i.to_bytes(2, "big") * 500
    assert not list(dest.rglob(".tmp-*"))


def test_an_object_gone_between_the_listing_and_its_get_is_one_line_and_leaves_no_file(s3_env, seaweed, tmp_path):
    from trainer import datasync
    from trainer.storage import MissingObject

    getter = datasync._Getter(seaweed.client(), "data", 4)
    with pytest.raises(MissingObject, match=r"^s3://data/gone/a.jpg: no such object$"):
        datasync._fetch(getter, "s3://data/gone/a.jpg", "gone/a.jpg", tmp_path / "a.jpg", 100)
    assert list(tmp_path.iterdir()) == [] and getter.fast  # the store answered: the fast path stays on


def test_data_sync_streams_objects_to_disk(s3_env, seaweed, tmp_path):
    """A 96 MiB object lands on disk without ever being held whole in Python memory."""
    import tracemalloc

    size = 96 * 1024 * 1024
    seaweed.client().put_object(Bucket="data", Key="big/train/c0/blob.bin", Body=b"\x07" * size)
    tracemalloc.start()
    try:
        assert sync_prefix("s3://data/big", tmp_path / "mirror") == 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "mirror/train/c0/blob.bin").stat().st_size == size
    assert peak < size / 2, f"peak Python allocation {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB object"


def test_data_source_preflight_tells_missing_from_unreachable(s3_env, seaweed):
    from thaw_contract.spec import SpecError
    from trainer.datasync import check_prefix
    from trainer.storage import StoreError

    with pytest.raises(SpecError, match=r"^spec.data.source: s3://data/nothing-here: no objects under this prefix"):
        check_prefix("s3://data/nothing-here")
    with pytest.raises(SpecError, match="bucket 'nobucket' does not exist"):
        check_prefix("s3://nobucket/x")
    with pytest.raises(StoreError) as err:  # nobody listening: transient, retried, then not a config error
        check_prefix("s3://data/x", endpoint="http://127.0.0.1:9", timeout_seconds=1)
    assert err.value.transient


def test_training_reads_an_s3_image_folder_downloaded_once_per_node(s3_env, seaweed, tmp_path):
    """data.source s3://...: the trainer mirrors the prefix into its cache, then a rerun downloads nothing."""
    import subprocess
    import sys

    import yaml
    from torchvision.io import encode_png

    from tests.builders import job_doc
    from tests.integration.conftest import ROOT

    client = seaweed.client()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("test", 4)):
        for label in ("dark", "light"):
            for i in range(n):
                base = 40 if label == "dark" else 200
                img = (torch.full((3, 16, 16), base) + torch.randint(0, 30, (3, 16, 16), generator=g)).to(torch.uint8)
                client.put_object(
                    Bucket="data", Key=f"imgs/{split}/{label}/{i}.png", Body=encode_png(img).numpy().tobytes()
                )
    doc = job_doc(
        data={
            "source": "s3://data/imgs",
            "imageSize": 32,
            "valPerClass": 2,
            "batchSize": 8,
            "cacheDir": str(tmp_path / "cache"),
        },
        model={"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 2},
        checkpoint={"uri": f"file://{tmp_path}/store"},
        metrics={"enabled": False},
    )
    doc["spec"]["stages"] = doc["spec"]["stages"][:1]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "data: s3://data/imgs ->" in first.stdout and "(32 objects downloaded)" in first.stdout
    doc["metadata"]["name"] = "again"
    path.write_text(yaml.safe_dump(doc))
    second = subprocess.run(
        [sys.executable, "-m", "trainer", "run", str(path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(0 objects downloaded)" in second.stdout
