"""`python -m trainer pack SRC DST`: an ImageFolder (a local folder or an s3:// prefix) as shards.

SRC holds train/<class>/* and test/<class>/* (or val/): the layout a FineTuneJob reads as a
folder. DST (a local folder or an s3:// prefix) receives WebDataset tar shards written by
webdataset's ShardWriter and, last, the manifest trainer/shards.py reads. Image bytes are copied
as they are (nothing is decoded or re-encoded): a file that does not decode is found, counted
and named by the stage that reads it, as for a folder. Each finished shard is uploaded and
deleted before the next is written, so packing needs about one shard of local disk beyond an
s3:// source's own mirror.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from thaw_contract.spec import SpecError
from trainer.shards import MANIFEST, manifest_doc
from trainer.storage import MiB

SHARD_BYTES = 64 * MiB  # big enough for full-speed GETs, small enough to start training after one


def _split_dirs(root: Path) -> dict[str, Path]:
    if not (root / "train").is_dir():
        raise SpecError(f"pack: {root}/train is not a directory (ImageFolder layout: train/<class>/*.jpg)")
    test = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if test is None:
        raise SpecError(f"pack: {root} needs a test/ or val/ folder beside train/")
    return {"train": root / "train", "test": test}


def _samples(dirs: dict[str, Path]) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    classes, index = find_classes(str(dirs["train"]))
    test_classes, _ = find_classes(str(dirs["test"]))
    if test_classes != classes:
        only = sorted(set(classes) ^ set(test_classes))
        raise SpecError(
            f"pack: the class folders of {dirs['test']} and {dirs['train']} differ (only in one: {', '.join(only)})"
        )
    out = {}
    for split, d in dirs.items():
        samples = make_dataset(str(d), index, extensions=IMG_EXTENSIONS, allow_empty=True)
        counts = np.bincount([y for _, y in samples], minlength=len(classes))
        if (counts == 0).any():
            raise SpecError(f"pack: {d}/{classes[int(np.argmin(counts))]} holds no images")
        out[split] = samples
    return classes, out


class _Destination:
    """A local folder or an s3:// prefix that finished files are moved into."""

    def __init__(self, dst: str, endpoint: str | None):
        self.dst = dst.rstrip("/")
        if dst.startswith("s3://"):
            from trainer.storage import S3Store, s3_client

            self.store = S3Store(self.dst, s3_client(endpoint))
        else:
            self.store = None
            Path(self.dst.removeprefix("file://")).mkdir(parents=True, exist_ok=True)

    def put(self, path: Path, name: str) -> None:
        if self.store is None:
            shutil.move(str(path), Path(self.dst.removeprefix("file://")) / name)
            return
        from trainer.storage import StoreError

        try:
            self.store.client.upload_file(
                str(path), self.store.bucket, self.store._key(name), Config=self.store.transfer
            )
        except Exception as err:
            raise StoreError(f"pack: cannot write {self.dst}/{name}: {str(err).splitlines()[0]}") from None
        path.unlink()


def pack(
    src: str,
    dst: str,
    shard_bytes: int = SHARD_BYTES,
    seed: int = 0,
    endpoint: str | None = None,
    log=print,
) -> dict:
    """Pack SRC into DST; returns the manifest written."""
    import webdataset as wds

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="thaw-pack-") as tmp:
        root = _source_root(src, endpoint, Path(tmp))
        classes, samples = _samples(_split_dirs(root))
        out = _Destination(dst, endpoint)
        work = Path(tmp) / "shards"
        work.mkdir()
        splits: dict[str, list[dict]] = {}
        for split, items in samples.items():
            rows: list[dict] = []
            labels: dict[str, list[int]] = {}

            def finished(fname: str, rows=rows, labels=labels) -> None:
                path = Path(fname)
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                row = {"name": path.name, "bytes": path.stat().st_size, "sha256": digest, "labels": labels[fname]}
                rows.append(row)
                out.put(path, path.name)
                log(f"pack: {path.name}: {len(labels[fname])} images, {rows[-1]['bytes'] / MiB:.1f} MiB")

            order = np.random.default_rng([seed, SPLIT_SEED[split]]).permutation(len(items))
            pattern = str(work / f"{split}-%06d.tar")
            with wds.ShardWriter(pattern, maxcount=10**9, maxsize=shard_bytes, post=finished, verbose=0) as sink:
                keys: set[str] = set()
                for n, k in enumerate(order):
                    path, label = items[k]
                    key = sample_key(Path(path), classes[label], n, keys)
                    ext = Path(path).suffix.lower().lstrip(".")
                    sink.write({"__key__": key, ext: Path(path).read_bytes(), "cls": label})
                    labels.setdefault(sink.fname, []).append(label)
            splits[split] = rows
        doc = manifest_doc(classes, splits)
        manifest = work / MANIFEST
        manifest.write_text(json.dumps(doc, separators=(",", ":")))
        out.put(manifest, MANIFEST)
    n = {s: sum(len(r["labels"]) for r in rows) for s, rows in splits.items()}
    log(
        f"pack: {dst}: {len(classes)} classes, {n['train']} train and {n['test']} test images in "
        f"{len(splits['train'])} + {len(splits['test'])} shards ({time.monotonic() - start:.1f} s); "
        f"digest {doc['digest'][:12]}"
    )
    return doc


SPLIT_SEED = {"train": 0, "test": 1}


def sample_key(path: Path, cls: str, n: int, taken: set[str]) -> str:
    """<class>/<file stem>: a bad image in a shard is named as the file it came from. WebDataset
    splits a member's name at the first dot of its last part, so dots become underscores."""
    key = f"{cls}/{path.stem}".replace(".", "_")
    if key in taken:  # a.jpg beside a.png
        key = f"{key}~{n}"
    taken.add(key)
    return key


def _source_root(src: str, endpoint: str | None, tmp: Path) -> Path:
    if not src.startswith("s3://"):
        root = Path(src.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise SpecError(f"pack: {root} is not a directory")
        return root
    from trainer.datasync import sync_prefix

    mirror = tmp / "source"
    n = sync_prefix(src, mirror, endpoint)
    print(f"pack: {src}: {n} objects fetched", flush=True)
    return mirror
