"""An s3:// dataset prefix mirrored once per node into the local data cache.

Local rank 0 syncs, the others wait at a barrier. The mirror keeps an index of (key, size,
ETag); a re-run against an unchanged prefix lists the bucket and downloads nothing, a changed
object is fetched again, a removed one is deleted locally. Objects are fetched FETCH_THREADS at
a time (a dataset is many small objects: one GET at a time leaves the link idle between
round trips); one object is written to a temporary name and renamed, so a file in the mirror
is always whole. An interrupted sync keeps what it finished (the index is written either way).

A small object is a presigned GET through one urllib3 pool: botocore's per-request work (its
event hooks, response parsing) costs ~3 ms of CPU, which caps a 2-core node near 300 objects/s
however many threads wait on the network (benchmarks/bench_data.py). Anything but a whole 200
answer goes through the boto3 client instead, which says what went wrong (and a store the pool
cannot reach, e.g. behind a proxy only botocore reads, turns the fast path off).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from trainer.storage import MiB, StoreError, s3_client, s3_error, split_s3_uri

INDEX = ".thaw-sync.json"
RETRY_SECONDS = 120.0  # how long an unreachable data store is waited for (check and sync)
FETCH_THREADS = 32  # GETs in flight: what s5cmd and rclone use for many small objects


def cache_path(cache_dir: str, uri: str) -> Path:
    bucket, prefix = split_s3_uri(uri)
    tag = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser() / "s3" / f"{bucket}-{prefix.replace('/', '_')}-{tag}"


@contextlib.contextmanager
def cache_lock(dest: Path):
    """Held while dest is synced: with spec.dataCache every stage pod of a job mounts the same
    volume, so another pod's sync of this prefix waits for this one, then finds it current."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_room(dest: Path, need: int, what: str) -> None:
    """`need` more bytes fit in the data cache holding dest, or a SpecError naming what bounds it
    (a full volume mid-sync would fail the stage with ENOSPC on every retry)."""
    from thaw_contract.spec import SpecError

    where = dest
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise SpecError(
            f"spec.dataCache.size: {what} needs {_size(need)} more in the data cache, which has {_size(free)} "
            "free; give the job a larger cache volume (or, run locally, data.cacheDir a disk with room)"
        )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def unsafe_key(key: str) -> str | None:
    """Why an object key (relative to the prefix) cannot be a path in the mirror: it would land
    outside it (`..`, a leading `/`) or on the sync's own files. None if it is fine."""
    parts = key.split("/")
    if key.startswith("/") or ".." in parts or "" in parts or "\0" in key:
        return "it would land outside the data cache"
    if key == INDEX or parts[-1].startswith(".tmp-"):
        return "its name is one the sync uses for its own files"
    return None


def plan_sync(remote: dict[str, tuple[int, str]], local: dict[str, tuple[int, str]]) -> tuple[list[str], list[str]]:
    """(keys to download, keys to delete) so that the mirror matches the listing."""
    fetch = sorted(k for k, v in remote.items() if local.get(k) != v)
    drop = sorted(k for k in local if k not in remote)
    return fetch, drop


def check_prefix(uri: str, endpoint: str | None = None, timeout_seconds: float = RETRY_SECONDS) -> None:
    """The prefix lists and holds at least one object. What the user must fix (denied, no bucket,
    empty prefix) is a SpecError; an unreachable store is retried, then a transient StoreError."""
    from thaw_contract.spec import SpecError
    from trainer.storage import retrying

    client = s3_client(endpoint)
    bucket, prefix = split_s3_uri(uri)

    def first() -> None:
        try:
            page = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)
        except Exception as err:
            raise s3_error(err, uri, bucket, "list") from None
        if not page.get("Contents"):
            raise StoreError(f"{uri}: no objects under this prefix")

    try:
        retrying(first, timeout_seconds, f"list {uri}", transient_only=True)
    except StoreError as err:
        if err.transient:
            raise
        raise SpecError(f"spec.data.source: {err}") from None


def sync_prefix(uri: str, dest: Path, endpoint: str | None = None, threads: int = FETCH_THREADS) -> int:
    """Mirror uri into dest; returns the number of objects downloaded."""
    client = s3_client(endpoint, max_connections=threads)
    bucket, prefix = split_s3_uri(uri)
    full = f"{prefix}/" if prefix else ""
    listing = _listing(client, uri, bucket, full)
    index_file = dest / INDEX
    local = {k: tuple(v) for k, v in json.loads(index_file.read_text()).items()} if index_file.is_file() else {}
    # Files removed by hand are fetched again; an index written before keys were checked is read
    # through the same check, so a drop never unlinks outside the mirror.
    local = {k: v for k, v in local.items() if unsafe_key(k) is None and (dest / k).is_file()}
    fetch, drop = plan_sync(listing, local)
    check_room(dest, sum(listing[k][0] for k in fetch) - sum(local[k][0] for k in drop), uri)
    for key in drop:
        (dest / key).unlink(missing_ok=True)
        del local[key]
    dest.mkdir(parents=True, exist_ok=True)
    fetching = set(fetch)
    done = {k: v for k, v in local.items() if k not in fetching}

    getter = _Getter(client, bucket, threads)

    def one(key: str) -> None:
        _fetch(getter, f"{uri}/{key}", full + key, dest / key, listing[key][0])
        done[key] = listing[key]  # one dict item set: safe across threads

    try:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="data-sync") as pool:
            futures = [pool.submit(one, k) for k in fetch]
            finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in finished if f.exception() is not None), None)
            if failed is not None:
                pool.shutdown(cancel_futures=True)
                raise failed.exception()
    finally:  # what finished stays finished: the next sync (a retry) fetches only the rest
        index_file.write_text(json.dumps(done))
    return len(fetch)


def _listing(client, uri: str, bucket: str, full: str) -> dict[str, tuple[int, str]]:
    """key (relative to the prefix) -> (size, ETag), every key checked for a safe local path."""
    listing: dict[str, tuple[int, str]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=full):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    listing[o["Key"][len(full) :]] = (o["Size"], o["ETag"].strip('"'))
    except Exception as err:
        raise s3_error(err, uri, bucket, "list") from None
    if not listing:
        raise StoreError(f"{uri}: no objects under this prefix")
    for key in listing:
        why = unsafe_key(key)
        if why is not None:
            raise StoreError(f"{uri}: object key {key!r} cannot be mirrored ({why}); rename or remove it")
    return listing


class _Getter:
    """GETs of one bucket: small objects presigned through a urllib3 pool, the rest (and every
    failure, to name it) through the boto3 client."""

    def __init__(self, client, bucket: str, threads: int):
        import urllib3

        self.client, self.bucket = client, bucket
        self.pool = urllib3.PoolManager(
            maxsize=max(1, threads),
            timeout=urllib3.Timeout(connect=5, read=60),
            retries=False,
            ca_certs=os.environ.get("AWS_CA_BUNDLE"),
        )
        self.fast = True
        self._lock = threading.Lock()

    def small(self, key: str, tmp: Path, size: int) -> None:
        if self.fast and self._presigned(key, tmp, size):
            return
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        with open(tmp, "wb") as f:
            shutil.copyfileobj(body, f, MiB)

    def _presigned(self, key: str, tmp: Path, size: int) -> bool:
        """Whether the object landed whole through the pool."""
        import urllib3

        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key})
        try:
            r = self.pool.request("GET", url, preload_content=False)
        except urllib3.exceptions.HTTPError:
            with self._lock:
                self.fast = False  # unreachable this way: every later object goes through botocore
            return False
        try:
            if r.status != 200:
                return False
            with open(tmp, "wb") as f:
                for chunk in r.stream(MiB):
                    f.write(chunk)
            return tmp.stat().st_size == size
        except urllib3.exceptions.HTTPError:
            return False
        finally:
            r.release_conn()

    def large(self, key: str, tmp: Path) -> None:
        """boto3's transfer manager (ranged parts, 4 at a time): memory is bounded by the parts in
        flight, never the object."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
        self.client.download_file(self.bucket, key, str(tmp), Config=config)


def _fetch(getter: _Getter, name: str, key: str, path: Path, size: int) -> None:
    """One object to a temporary name, then renamed: a file in the mirror is always whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        if size < 8 * MiB:
            getter.small(key, tmp, size)
        else:
            getter.large(key, tmp)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise s3_error(err, name, getter.bucket, "read") from None
    os.replace(tmp, path)
