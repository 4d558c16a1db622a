"""An s3:// dataset prefix mirrored once per node into the local data cache.

Local rank 0 syncs, the others wait at a barrier. The mirror keeps an index of (key, size,
ETag); a re-run against an unchanged prefix lists the bucket and downloads nothing, a changed
object is fetched again, a removed one is deleted locally.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trainer.storage import MiB, StoreError, s3_client, s3_error, split_s3_uri

INDEX = ".thaw-sync.json"
RETRY_SECONDS = 120.0  # how long an unreachable data store is waited for (check and sync)


def cache_path(cache_dir: str, uri: str) -> Path:
    bucket, prefix = split_s3_uri(uri)
    tag = hashlib.sha256(uri.encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser() / "s3" / f"{bucket}-{prefix.replace('/', '_')}-{tag}"


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


def sync_prefix(uri: str, dest: Path, endpoint: str | None = None) -> int:
    """Mirror uri into dest; returns the number of objects downloaded."""
    client = s3_client(endpoint)
    bucket, prefix = split_s3_uri(uri)
    from boto3.s3.transfer import TransferConfig

    # Parts of 8 MiB, 4 at a time: memory is bounded by the parts in flight, not the object size.
    transfer = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=4)
    listing: dict[str, tuple[int, str]] = {}
    full = f"{prefix}/" if prefix else ""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=full):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/"):
                    listing[o["Key"][len(full) :]] = (o["Size"], o["ETag"].strip('"'))
    except Exception as err:
        raise s3_error(err, uri, bucket, "list") from None
    if not listing:
        raise StoreError(f"{uri}: no objects under this prefix")
    index_file = dest / INDEX
    local = {k: tuple(v) for k, v in json.loads(index_file.read_text()).items()} if index_file.is_file() else {}
    local = {k: v for k, v in local.items() if (dest / k).is_file()}  # files removed by hand are fetched again
    fetch, drop = plan_sync(listing, local)
    for key in fetch:
        path = dest / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}")
        # Streamed to disk by boto3's transfer manager (ranged, parallel parts): never the whole object in memory.
        try:
            client.download_file(bucket, full + key, str(tmp), Config=transfer)
        except Exception as err:
            tmp.unlink(missing_ok=True)
            raise s3_error(err, f"{uri}/{key}", bucket, "read") from None
        os.replace(tmp, path)
    for key in drop:
        (dest / key).unlink(missing_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    index_file.write_text(json.dumps(listing))
    return len(fetch)
