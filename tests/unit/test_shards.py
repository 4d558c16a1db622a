"""Shard sets (trainer/shards.py, trainer/pack.py) on a local folder: the pack, the manifest's
checks, the epoch order that gives each rank its own shards, and WebDataset reading them too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from thaw_contract.spec import DataSpec, SpecError
from trainer.data import build_datasets
from trainer.pack import pack
from trainer.shards import MANIFEST, ShardSampler, epoch_order, manifest_digest


def image_folder(root: Path, per_class: dict[str, int], test: int = 3, corrupt: str | None = None) -> Path:
    """train/<class>/<i>.png (16 px, dark or light by class) and test/<class>/*; `corrupt` is a
    train file (class/name) replaced by bytes that are no image."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for k, (cls, n) in enumerate(per_class.items()):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else test):
                img = (torch.full((3, 16, 16), 40 + 150 * k) + torch.randint(0, 30, (3, 16, 16), generator=g)).to(
                    torch.uint8
                )
                (d / f"{i}.png").write_bytes(encode_png(img).numpy().tobytes())
    if corrupt:
        (root / "train" / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    src = image_folder(root / "src", {"dark": 20, "light": 20, "mid": 20}, corrupt="light/3.png")
    pack(str(src), str(root / "out"), shard_bytes=8 * 1024, log=lambda _: None)
    return src, root / "out"


def test_pack_writes_every_image_once_into_mixed_shards_with_a_manifest_that_checks_itself(packed):
    src, out = packed
    doc = json.loads((out / MANIFEST).read_text())
    assert doc["classes"] == ["dark", "light", "mid"]
    assert doc["digest"] == manifest_digest(doc)
    train = doc["splits"]["train"]
    assert len(train) > 3, "8 KiB shards: several"
    labels = [y for row in train for y in row["labels"]]
    assert sorted(labels) == [0] * 20 + [1] * 20 + [2] * 20
    assert len(set(train[0]["labels"])) > 1, "the pack's shuffle mixes classes within a shard"
    assert sum(len(r["labels"]) for r in doc["splits"]["test"]) == 9
    for row in train:
        assert (out / row["name"]).stat().st_size == row["bytes"]
    # The image bytes are the files' own (nothing re-encoded).
    import tarfile

    with tarfile.open(out / train[0]["name"]) as tar:
        first = next(m for m in tar if m.name.endswith(".png"))
        cls, name = first.name.split("/")
        assert tar.extractfile(first).read() == (src / "train" / cls / name).read_bytes()


def test_a_stage_reads_the_shards_as_it_reads_a_folder_and_names_the_bad_image_by_its_file(packed):
    src, out = packed
    spec = DataSpec(source=f"file://{out}", image_size=16, val_per_class=2, max_bad_fraction=0.1)
    shards = build_datasets(spec, 3, seed=0)
    folder = build_datasets(spec.model_copy(update={"source": f"file://{src}"}), 3, seed=0)
    assert shards.classes == folder.classes
    assert (len(shards.train), len(shards.val), len(shards.test)) == (54, 6, 9)
    assert torch.equal(torch.bincount(shards.val.labels), torch.tensor([2, 2, 2]))
    images = {}
    for k in range(len(shards.train)):
        x, y = shards.train[k]
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
        images.setdefault(y, []).append(x.float().mean().item())
    assert max(images[0]) < min(images[1]), "labels travel with their images (dark below light)"
    (name, why), *others = shards.bad.seen().items()  # named as <shard>/<class>/<file>, the file it came from
    assert not others and why == "OSError: Truncated File Read"
    assert name.startswith("train-") and name.endswith(".tar/light/3.png"), name


def test_webdataset_reads_the_shards_too(packed):
    import webdataset as wds

    _, out = packed
    doc = json.loads((out / MANIFEST).read_text())
    urls = [str(out / r["name"]) for r in doc["splits"]["test"]]
    got = [(s["__key__"], int(s["cls"])) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert [y for _, y in got] == [y for r in doc["splits"]["test"] for y in r["labels"]]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.update(classes=["a", "b", "c"]), r"its digest does not match its content"),
        (lambda d: d.update(format="other/9"), r"format is 'other/9', not 'thaw-shards/1'"),
        (lambda d: d["splits"].pop("test"), r"it has no test shards"),
    ],
    ids=["edited", "format", "no-test"],
)
def test_a_bad_manifest_is_one_line_naming_the_source(packed, tmp_path, edit, expected):
    _, out = packed
    copy = tmp_path / "copy"
    copy.mkdir()
    doc = json.loads((out / MANIFEST).read_text())
    edit(doc)
    if "digest does not" not in expected:
        doc["digest"] = manifest_digest(doc)
    (copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=rf"^spec.data.source: file://{copy}/thaw-shards.json: {expected}") as err:
        build_datasets(DataSpec(source=f"file://{copy}", image_size=16, val_per_class=2), 3, 0)
    assert "\n" not in str(err.value)


def test_data_shape_mistakes_on_shards_name_the_field(packed):
    _, out = packed
    with pytest.raises(SpecError, match=r"^spec.model.numClasses: 4 does not match the 3 classes of file://"):
        build_datasets(DataSpec(source=f"file://{out}", image_size=16, val_per_class=2), 4, 0)
    with pytest.raises(SpecError, match=r"^spec.data.valPerClass: 20 leaves no training images of class"):
        build_datasets(DataSpec(source=f"file://{out}", image_size=16, val_per_class=20), 3, 0)


def test_pack_refuses_a_folder_that_is_not_an_image_folder_with_one_line(tmp_path):
    src = image_folder(tmp_path / "src", {"a": 2, "b": 2})
    (tmp_path / "src" / "test" / "b").rename(tmp_path / "src" / "test" / "c")
    with pytest.raises(SpecError, match=r"^pack: the class folders of .*test and .*train differ \(only in one: b, c\)"):
        pack(str(src), str(tmp_path / "out"), log=lambda _: None)
    with pytest.raises(SpecError, match=r"^pack: .*/nowhere is not a directory"):
        pack(str(tmp_path / "nowhere"), str(tmp_path / "out"), log=lambda _: None)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_each_rank_reads_its_own_run_of_shards_and_every_sample_once_an_epoch():
    shard_of = np.repeat(np.arange(12), 10)  # 12 shards of 10
    parts = [epoch_order(shard_of, 3, r, seed=5, epoch=0) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(120))
    for p in parts:
        assert len(np.unique(shard_of[p])) == 4, "a rank reads a third of the shards"
    again = epoch_order(shard_of, 3, 1, seed=5, epoch=0)
    assert np.array_equal(again, parts[1]), "the order is a function of seed and epoch alone (exact resume)"
    assert not np.array_equal(epoch_order(shard_of, 3, 1, seed=5, epoch=1), parts[1])


def test_a_run_that_does_not_divide_is_padded_like_distributed_sampler():
    shard_of = np.repeat(np.arange(3), [5, 4, 2])  # 11 samples, 2 ranks
    parts = [epoch_order(shard_of, 2, r, seed=0, epoch=0) for r in range(2)]
    assert [len(p) for p in parts] == [6, 6]
    assert set(np.concatenate(parts).tolist()) == set(range(11))


def test_the_sampler_follows_the_training_subset_and_has_one_length(packed):
    _, out = packed
    data = build_datasets(DataSpec(source=f"file://{out}", image_size=16, val_per_class=2, train_per_class=4), 3, 0)
    sampler = ShardSampler(data.train, world=2, rank=0, seed=0)
    assert len(sampler) == 6
    for epoch in range(3):
        sampler.set_epoch(epoch)
        ks = list(sampler)
        assert len(ks) == 6 and all(0 <= k < len(data.train) for k in ks)


def test_a_process_forked_while_a_shard_is_being_fetched_does_not_keep_its_lock(tmp_path):
    """DataLoader workers fork while prefetch threads hold shard locks; a flock belongs to the
    open file the fork shares, so the child would hold it as long as it lives."""
    import fcntl
    import os
    import threading
    import time

    from trainer.shards import Shard, ShardFiles

    files = ShardFiles("s3://b/p", {"a.tar": Shard("a.tar", 1, "ab" * 32, np.zeros(1, dtype=np.int64))}, tmp_path, None)
    holding = threading.Event()

    def slow_fetch(name, path):
        holding.set()
        time.sleep(1)
        path.write_bytes(b"x")

    files._fetch = slow_fetch
    fetcher = threading.Thread(target=files.local, args=("a.tar",))
    fetcher.start()
    holding.wait()
    child = os.fork()
    if child == 0:  # a worker: lives on, reads nothing
        time.sleep(4)
        os._exit(0)
    try:
        fetcher.join()
        with open(tmp_path / ".a.tar.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the child kept it
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)
