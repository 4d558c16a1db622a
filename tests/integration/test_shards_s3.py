"""A shard set in a real SeaweedFS: packed from an s3:// image folder by the CLI, trained on by
two ranks that fetch each shard once per node, and a shard changed after packing refused."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from tests.builders import job_doc
from tests.integration.conftest import run, torchrun, write_job
from tests.unit.test_shards import image_folder
from thaw_contract.spec import DataSpec, SpecError
from trainer.data import build_datasets
from trainer.shards import MANIFEST

pytestmark = pytest.mark.integration


def _upload(client, root: Path, bucket: str, prefix: str) -> int:
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in files:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(root)}", Body=p.read_bytes())
    return len(files)


@pytest.fixture(scope="module")
def packed_in_store(seaweed, tmp_path_factory):
    """s3://data/raw (an image folder, one corrupt image) packed by the CLI into s3://data/packed."""
    root = tmp_path_factory.mktemp("raw")
    image_folder(root, {"dark": 24, "light": 24}, test=4, corrupt="dark/0.png")
    client = seaweed.client()
    _upload(client, root, "data", "raw")
    env = seaweed.env()
    out = run(
        [sys.executable, "-m", "trainer", "pack", "s3://data/raw", "s3://data/packed", "--shard-mib", "0.01"], **env
    )
    assert "pack: s3://data/raw: 56 objects fetched" in out.stdout
    doc = json.loads(client.get_object(Bucket="data", Key=f"packed/{MANIFEST}")["Body"].read())
    return doc


def _job(tmp_path: Path, name: str, cache: Path) -> Path:
    doc = job_doc(
        data={
            "source": "s3://data/packed",
            "imageSize": 32,
            "valPerClass": 2,
            "batchSize": 8,
            "cacheDir": str(cache),
            "maxBadFraction": 0.05,
        },
        model={"architecture": "efficientnet_lite0", "weights": "BUNDLED", "numClasses": 2},
        checkpoint={"uri": f"file://{tmp_path}/store"},
        metrics={"enabled": False},
    )
    doc["metadata"]["name"] = name
    doc["spec"]["stages"] = doc["spec"]["stages"][:1]
    return write_job(tmp_path, doc, f"{name}.yaml")


def test_two_ranks_train_on_shards_in_the_store_and_a_rerun_fetches_nothing(s3_env, packed_in_store, tmp_path):
    n = len(packed_in_store["splits"]["train"]) + len(packed_in_store["splits"]["test"])
    assert n >= 4, "small shards: several per split"
    cache = tmp_path / "cache"
    first = torchrun(2, "-m", "trainer", "run", str(_job(tmp_path, "first", cache)))
    said = [line for line in first.stdout.splitlines() if "in the node cache" in line]
    assert f"data: s3://data/packed: 0 of {n} shards (0.0 MiB) in the node cache" in said[0]
    assert f"data: s3://data/packed: {n} of {n} shards" in said[-1], "every shard fetched once, into the cache"
    logs = first.stdout + first.stderr
    assert "warning: data:" in logs and ".tar/dark/0.png" in logs, "the corrupt image is skipped and named"
    again = torchrun(2, "-m", "trainer", "run", str(_job(tmp_path, "again", cache)))
    said = [line for line in again.stdout.splitlines() if "in the node cache" in line]
    assert f"{n} of {n} shards" in said[0], "a rerun on the same node finds every shard in its cache"


def test_ranks_and_workers_that_want_one_shard_fetch_it_once(s3_env, packed_in_store, tmp_path):
    spec = DataSpec(source="s3://data/packed", image_size=16, val_per_class=2, cache_dir=str(tmp_path))
    readers = [build_datasets(spec, 2, 0) for _ in range(4)]  # four processes' worth of shard files
    names = list(readers[0].train.split.folder.files.shards)

    def read_all(data) -> None:
        for name in names:
            data.train.split.folder.files.local(name)

    threads = [threading.Thread(target=read_all, args=(d,)) for d in readers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(d.train.split.folder.files.fetched for d in readers) == len(names)


def test_a_shard_changed_after_packing_is_refused_with_one_line(s3_env, seaweed, packed_in_store, tmp_path):
    client = seaweed.client()
    name = packed_in_store["splits"]["test"][0]["name"]
    client.copy_object(
        Bucket="data", CopySource={"Bucket": "data", "Key": "packed/" + MANIFEST}, Key="swap/" + MANIFEST
    )
    for row in packed_in_store["splits"]["train"] + packed_in_store["splits"]["test"]:
        body = b"not the shard" if row["name"] == name else None
        if body is None:
            client.copy_object(
                Bucket="data", CopySource={"Bucket": "data", "Key": "packed/" + row["name"]}, Key="swap/" + row["name"]
            )
        else:
            client.put_object(Bucket="data", Key="swap/" + name, Body=body)
    spec = DataSpec(source="s3://data/swap", image_size=16, val_per_class=2, cache_dir=str(tmp_path))
    data = build_datasets(spec, 2, 0)
    with pytest.raises(
        SpecError, match=rf"^spec.data.source: s3://data/swap/{name}: its SHA-256 \w+\.\.\. is not the manifest's"
    ) as err:
        data.test[0]
    assert "\n" not in str(err.value)
    assert not list(Path(data.test.split.folder.files.cache).glob(f"*{name}")), "nothing half-fetched is kept"
