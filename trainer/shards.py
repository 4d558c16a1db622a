"""Shards: an image data set as WebDataset tar files with a manifest, for data sets of many files.

`python -m trainer pack SRC DST` (trainer/pack.py) writes each split as tar shards of about
64 MiB (`train-000000.tar`, ..., `test-000000.tar`: WebDataset's layout, one `<key>.<ext>` image
and one `<key>.cls` label per sample, so `webdataset.WebDataset` reads them too) in a seeded
random order, then `thaw-shards.json`: the class names, and per shard its size, SHA-256 and the
label of each image in order. The manifest carries its own digest and is written last, so a
reader never sees one whose shards are missing.

A stage reads the manifest first: the splits (validation, the few-shot subset) and every data-shape
check come from its labels before a single image byte is fetched. Shards are fetched whole (the
transfer manager's parallel ranged GETs) into the node's cache under their SHA-256, so a re-packed
data set never meets a stale file. Each epoch the shards are dealt out in a seeded order and each
rank reads its own contiguous run of them (`epoch_order`), so training starts when the rank's first
shard is in; a prefetcher fetches the rest in the order the rank will read them. Reading a sample
is one pread at the offset the tar's header gave: random access, so a resumed epoch and every
sampler the stage uses stay exactly as they are for a folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import queue
import re
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from thaw_contract.spec import SpecError

MANIFEST = "thaw-shards.json"
FORMAT = "thaw-shards/1"
SPLITS = ("train", "test")
PREFETCH = 4  # shards the prefetcher fetches at once (each one a parallel multipart GET)


@dataclass(frozen=True)
class Shard:
    name: str
    bytes: int
    sha256: str
    labels: np.ndarray  # int64, one per image, in the shard's order


@dataclass(frozen=True)
class Manifest:
    classes: tuple[str, ...]
    splits: dict[str, list[Shard]]
    digest: str


def manifest_digest(doc: dict) -> str:
    """SHA-256 of the manifest without its digest field, in canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_doc(classes: list[str], splits: dict[str, list[dict]]) -> dict:
    doc = {"format": FORMAT, "classes": list(classes), "splits": splits}
    doc["digest"] = manifest_digest(doc)
    return doc


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """The manifest at `where`, checked; a SpecError naming spec.data.source for any defect."""

    def bad(why: str) -> SpecError:
        return SpecError(f"spec.data.source: {where}: {why}")

    try:
        doc = json.loads(raw)
    except ValueError:
        raise bad("not JSON (a Thaw shard manifest is written by `python -m trainer pack`)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise bad(f"format is {got!r}, not {FORMAT!r} (pack the data set again with this version)")
    if doc.get("digest") != manifest_digest(doc):
        raise bad("its digest does not match its content (edited or truncated after packing; pack again)")
    classes = doc.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise bad("classes must be a non-empty list of names")
    splits: dict[str, list[Shard]] = {}
    for split in SPLITS:
        rows = doc.get("splits", {}).get(split)
        if not isinstance(rows, list) or not rows:
            raise bad(f"it has no {split} shards")
        shards = []
        for row in rows:
            try:
                labels = np.asarray(row["labels"], dtype=np.int64)
                shard = Shard(str(row["name"]), int(row["bytes"]), str(row["sha256"]), labels)
            except (KeyError, TypeError, ValueError):
                raise bad(f"a {split} shard entry lacks name, bytes, sha256 or labels") from None
            if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
                raise bad(f"{shard.name} has a label outside 0..{len(classes) - 1}")
            if "/" in shard.name or shard.name.startswith("."):
                raise bad(f"shard name {shard.name!r} is not a plain file name")
            shards.append(shard)
        splits[split] = shards
    return Manifest(tuple(classes), splits, doc["digest"])


def epoch_order(shard_of: np.ndarray, world: int, rank: int, seed: int, epoch: int) -> np.ndarray:
    """This rank's sample positions for one epoch: shards in a seeded order, the samples of each
    shuffled, the whole run padded (from its start) to a multiple of `world` as DistributedSampler
    pads, and rank r given the r-th contiguous part, so it reads about 1/world of the shards."""
    rng = np.random.default_rng([seed, epoch])
    by_shard = np.argsort(shard_of, kind="stable")  # grouped once: O(n log n) at a million samples
    _, counts = np.unique(shard_of[by_shard], return_counts=True)
    groups = np.split(by_shard, np.cumsum(counts)[:-1])
    order = []
    for s in rng.permutation(len(groups)):
        order.append(groups[s][rng.permutation(len(groups[s]))])
    flat = np.concatenate(order) if order else np.empty(0, dtype=np.int64)
    per_rank = -(-len(flat) // world)
    flat = np.resize(flat, per_rank * world) if len(flat) else flat
    return flat[rank * per_rank : (rank + 1) * per_rank]


class ShardSampler(Sampler):
    """DistributedSampler's interface (set_epoch, one length every epoch) over epoch_order; each
    epoch's iteration also tells the shard files what this rank will read first."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        self.files: ShardFiles = dataset.split.folder.files
        split = dataset.split.folder
        self.shard_of = split.shard_of[np.asarray(dataset.indices)]
        self.names = split.shard_names
        self.world, self.rank, self.seed, self.epoch = world, rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.shard_of) // self.world)

    def __iter__(self):
        order = epoch_order(self.shard_of, self.world, self.rank, self.seed, self.epoch)
        first = list(dict.fromkeys(self.shard_of[order].tolist()))
        self.files.prefetch([self.names[s] for s in first])
        return iter(order.tolist())


class ShardFiles:
    """Where shards are read: a local folder of shards as it is, or an s3:// prefix fetched on
    first use into the node's cache (whole shards, verified, under their SHA-256). One fetch per
    shard per node: a file lock makes ranks and DataLoader workers that want the same shard wait
    for the first one's download instead of repeating it."""

    def __init__(self, source: str, shards: dict[str, Shard], cache: Path | None, endpoint: str | None):
        self.source, self.shards, self.cache, self.endpoint = source, shards, cache, endpoint
        self.fetched = 0  # shards this process downloaded
        self._queue: queue.Queue | None = None
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        if self.cache is None:
            return Path(self.source.removeprefix("file://")) / name
        return self.cache / f"{self.shards[name].sha256[:16]}-{name}"

    def cache_line(self) -> str:
        """What the node's cache holds of this shard set (said at the start and the end of a run)."""
        if self.cache is None:
            return f"data: {self.source}: {len(self.shards)} shards read in place"
        here = sum(self.path(n).exists() for n in self.shards)
        size = sum(s.bytes for n, s in self.shards.items() if self.path(n).exists()) / 2**20
        return f"data: {self.source}: {here} of {len(self.shards)} shards ({size:.1f} MiB) in the node cache"

    def check_room(self) -> None:
        """The shards not yet in the cache fit in it (a SpecError naming spec.dataCache.size)."""
        from trainer.datasync import check_room

        if self.cache is not None:
            missing = sum(s.bytes for n, s in self.shards.items() if not self.path(n).exists())
            check_room(self.cache, missing, self.source)

    def local(self, name: str) -> Path:
        """The shard as a local file, fetched first if need be."""
        path = self.path(name)
        if path.exists() or self.cache is None:
            if not path.exists():
                raise SpecError(f"spec.data.source: {self.source}: {name} is in the manifest but not in the folder")
            return path
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / f".{name}.lock", "w") as lock:
            _OPEN_LOCKS.add(lock.fileno())
            try:
                while True:  # polled: the shard may appear while another process holds the lock
                    try:
                        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if path.exists():
                            return path
                        time.sleep(0.05)
                if not path.exists():
                    self._fetch(name, path)
            finally:
                _OPEN_LOCKS.discard(lock.fileno())
        return path

    def _fetch(self, name: str, path: Path) -> None:
        from boto3.s3.transfer import TransferConfig

        from trainer.datasync import RETRY_SECONDS
        from trainer.storage import MiB, retrying, s3_client, s3_error, split_s3_uri

        bucket, prefix = split_s3_uri(self.source)
        key = f"{prefix}/{name}" if prefix else name
        tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{name}")
        config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)

        def get() -> None:
            try:
                s3_client(self.endpoint).download_file(bucket, key, str(tmp), Config=config)
            except Exception as err:
                raise s3_error(err, f"{self.source}/{name}", bucket, "read") from None

        try:
            retrying(get, RETRY_SECONDS, f"fetch {name}", transient_only=True)
            want = self.shards[name]
            got = _sha256(tmp)
            if got != want.sha256:
                raise SpecError(
                    f"spec.data.source: {self.source}/{name}: its SHA-256 {got[:12]}... is not the manifest's "
                    f"{want.sha256[:12]}... (the shard changed after packing; pack the data set again)"
                )
            os.replace(tmp, path)
            self.fetched += 1
        finally:
            tmp.unlink(missing_ok=True)

    def prefetch(self, names: list[str]) -> None:
        """Fetch these shards (then all others) in the background, in this order. The fetchers are
        daemon threads: a process that ends does not wait for them (a partial file is a `.tmp-`
        name, never a shard). Failures are left to the reader, which fetches again and says why."""
        if self.cache is None:
            return
        order = [n for n in names + [n for n in self.shards if n not in set(names)] if not self.path(n).exists()]
        with self._lock:
            start = self._queue is None
            if start:
                self._queue = queue.Queue()
        if start:  # the first shard alone: the first batch waits for it, not for four at once
            first, order = order[:1], order[1:]
            threading.Thread(target=self._start_prefetch, args=(first,), name="shard-prefetch", daemon=True).start()
        for name in order:
            self._queue.put(name)

    def _start_prefetch(self, first: list[str]) -> None:
        for name in first:
            _quietly(self.local, name)
        for _ in range(PREFETCH - 1):
            threading.Thread(target=self._prefetcher, name="shard-prefetch", daemon=True).start()
        self._prefetcher()

    def _prefetcher(self) -> None:
        while True:
            _quietly(self.local, self._queue.get())

    def __getstate__(self) -> dict:  # DataLoader workers get a copy without the prefetcher
        return {**self.__dict__, "_queue": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


# Lock files open in this process. A DataLoader worker forked while a prefetch thread holds one
# would keep that lock (flock belongs to the open file, which the fork shares) for as long as it
# lives: the child closes its copies at once.
_OPEN_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_OPEN_LOCKS):
        try:
            os.close(fd)
        except OSError:
            pass
    _OPEN_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - the reader fetches again and raises the one-line error
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


class _Names:
    """ImageFolder's `samples[i][0]` (a sample's name, for the bad-image record) without a list of
    a million paths."""

    def __init__(self, split: ShardSplit):
        self.split = split

    def __getitem__(self, i: int) -> tuple[str, int]:
        s, j = self.split.locate(i)
        member = self.split.members(s)[j][2]
        return f"{self.split.root}/{self.split.shard_names[s]}/{member}", int(self.split.labels[i])


class ShardSplit(Dataset):
    """One split of a shard set with what trainer/data.py asks of an ImageFolder: (image, label)
    by position and `samples[i][0]`, a sample's name."""

    root = "/shards"  # names in the bad-image record: <shard>/<position in shard>

    def __init__(self, shards: list[Shard], files: ShardFiles, size: int):
        self.files, self.size = files, size
        self.shard_names = [s.name for s in shards]
        self._expected = [len(s.labels) for s in shards]
        self.labels = np.concatenate([s.labels for s in shards])
        self.shard_of = np.repeat(np.arange(len(shards)), self._expected)
        self._starts = np.concatenate([[0], np.cumsum(self._expected)])
        self.samples = _Names(self)
        self._index: dict[int, list[tuple[int, int, str]]] = {}  # shard -> (offset, size, name) of each image

    def __len__(self) -> int:
        return len(self.labels)

    def locate(self, i: int) -> tuple[int, int]:
        s = int(self.shard_of[i])
        return s, i - int(self._starts[s])

    def members(self, s: int) -> list[tuple[int, int, str]]:
        if s not in self._index:
            path = self.files.local(self.shard_names[s])
            with tarfile.open(path, "r:") as tar:
                images = [(m.offset_data, m.size, m.name) for m in tar if m.isfile() and not m.name.endswith(".cls")]
            if len(images) != self._expected[s]:
                raise SpecError(
                    f"spec.data.source: {self.files.source}/{self.shard_names[s]} holds {len(images)} images, "
                    f"the manifest {self._expected[s]}"
                )
            self._index[s] = images
        return self._index[s]

    def read(self, i: int) -> bytes:
        s, j = self.locate(i)
        offset, size, _ = self.members(s)[j]
        fd = os.open(self.files.path(self.shard_names[s]), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from trainer.data import decode_file

        data = self.read(i)  # a fetch or index failure raises SpecError/StoreError, not a bad image
        try:
            return decode_file(io.BytesIO(data), self.size), int(self.labels[i])
        except Exception as err:  # the caller (trainer/data.py) records it as a bad image
            err.args = (re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err)),)  # PIL names no file here
            raise


def _s3_read(source: str, endpoint: str | None, what):
    """what(store) on the s3:// prefix, an unreachable store retried; a problem the user must fix
    (denied, no bucket) a SpecError naming spec.data.source."""
    from trainer.datasync import RETRY_SECONDS
    from trainer.storage import S3Store, StoreError, retrying, s3_client

    store = S3Store(source.rstrip("/"), s3_client(endpoint))
    try:
        return retrying(lambda: what(store), RETRY_SECONDS, f"read {source}", transient_only=True)
    except StoreError as err:
        if err.transient:
            raise
        raise SpecError(f"spec.data.source: {err}") from None


def open_manifest(source: str, endpoint: str | None) -> Manifest:
    """The manifest of a shard source (file:// folder or s3:// prefix)."""
    where = f"{source.rstrip('/')}/{MANIFEST}"
    if source.startswith("s3://"):
        raw = _s3_read(source, endpoint, lambda store: store.get(MANIFEST))
    else:
        try:
            raw = Path(where.removeprefix("file://")).read_bytes()
        except OSError as err:
            raise SpecError(f"spec.data.source: {where}: {err.strerror}") from None
    return parse_manifest(raw, where)


def is_shard_source(source: str, endpoint: str | None = None) -> bool:
    """A local folder or an s3:// prefix that holds a shard manifest."""
    if source.startswith("file://"):
        return (Path(source.removeprefix("file://")) / MANIFEST).is_file()
    if source.startswith("s3://"):
        return _s3_read(source, endpoint, lambda store: store.exists(MANIFEST))
    return False
