"""Object storage behind one small interface: `file://` directories and `s3://` buckets.

Keys are '/'-separated and relative to the store's root (the job's folder). Every write is
atomic per object (temp file + rename locally; a completed PUT or multipart upload in S3), so
a reader never sees half an object; a checkpoint as a whole is made atomic by its manifest.

Errors are `StoreError` (an OSError) with one line that names the URI and never a credential.
S3 goes through boto3: its transfer manager does multipart uploads with concurrent parts,
botocore's credential chain finds the keys (environment, shared files, IRSA, instance role).
"""

from __future__ import annotations

import io
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Protocol

from thaw_contract.spec import CheckpointSpec, SpecError

MiB = 1024 * 1024
log = logging.getLogger(__name__)


class StoreError(OSError):
    """A failed store operation; `transient` when retrying may help (network, 5xx, throttling)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __str__(self) -> str:
        return self.args[0]


class MissingObject(StoreError, FileNotFoundError):
    pass


class CheckpointError(RuntimeError):
    """A checkpoint that should exist does not verify, or could not be committed."""


class Store(Protocol):
    uri: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, keys: list[str]) -> None: ...


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise StoreError(f"{self.uri}/{key}: cannot write: {err.strerror}") from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MissingObject(f"{self.uri}/{key}: no such object") from None
        except OSError as err:
            raise StoreError(f"{self.uri}/{key}: cannot read: {err.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)
        for key in keys:  # drop folders emptied by the deletion
            parent = self._path(key).parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 30.0, jitter: float = 0.1) -> float:
    """Delay before retry `attempt` (1-based): base * 2^(attempt-1), capped, with +-jitter."""
    delay = min(cap, base * 2 ** min(attempt - 1, 32))
    return delay * (1 + random.uniform(-jitter, jitter))


def retrying(fn, timeout_seconds: float, what: str, on_failure=None, sleep=time.sleep, transient_only=False):
    """fn() until it succeeds or retrying would pass the deadline; then the last StoreError, annotated.
    With transient_only, an error retrying cannot help (denied, missing bucket) is raised at once."""
    deadline = time.monotonic() + timeout_seconds
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except StoreError as err:
            if transient_only and not err.transient:
                raise
            if on_failure is not None:
                on_failure()
            delay = backoff_seconds(attempt)
            if time.monotonic() + delay > deadline:
                raise StoreError(
                    f"{err} (gave up after {attempt} attempts in {timeout_seconds:g}s)", transient=err.transient
                ) from None
            log.warning("%s: attempt %d failed: %s; retrying in %.1fs", what, attempt, err, delay)
            sleep(delay)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_client(
    endpoint: str | None = None,
    region: str | None = None,
    path_style: bool = True,
    credentials: tuple[str, str] | None = None,
    max_connections: int = 10,
):
    """A client with explicit settings; credentials from boto3's chain unless given (the operator
    passes the ones it read from the job's Secret). `max_connections`: the pool, one per thread
    that uses the client at once (botocore's default is 10)."""
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path" if path_style else "auto"},
        connect_timeout=5,
        read_timeout=60,
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=max_connections,
    )
    # A fresh session: boto3's default one caches the credentials it found first.
    keys = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]} if credentials else {}
    return boto3.session.Session().client(
        "s3",
        **keys,
        endpoint_url=endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=config,
    )


_PERMANENT = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access denied (the credentials lack permission for this prefix)",
    "AllAccessDisabled": "access denied (the credentials lack permission for this prefix)",
    "InvalidAccessKeyId": "credentials rejected: unknown access key",
    "SignatureDoesNotMatch": "credentials rejected: the secret key does not match the access key",
    "InvalidToken": "credentials rejected: invalid session token",
    "ExpiredToken": "credentials rejected: the session token expired",
    "403": "access denied (HTTP 403: permission or credentials)",
    "404": "bucket {bucket!r} does not exist",
}


def s3_error(err: Exception, where: str, bucket: str, action: str) -> StoreError:
    """A one-line StoreError for any botocore failure; transient unless retrying cannot help."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(f"{where}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("NoSuchKey",) or (code == "404" and action == "read"):
            return MissingObject(f"{where}: no such object")
        if code in _PERMANENT:
            return StoreError(f"{where}: cannot {action}: {_PERMANENT[code].format(bucket=bucket)}")
        return StoreError(f"{where}: cannot {action}: {code or status}", transient=status >= 500 or status == 429)
    # Connection refused/reset, timeouts, DNS: the store may come back.
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return StoreError(f"{where}: cannot {action}: {first}", transient=True)


class S3Store:
    def __init__(self, uri: str, client, transfer_config=None):
        from boto3.s3.transfer import TransferConfig

        self.uri = uri
        self.bucket, self.prefix = split_s3_uri(uri)
        self.client = client
        # Multipart above 16 MiB, parts uploaded by 8 threads: a 100 MB checkpoint is 7 parallel PUTs.
        self.transfer = transfer_config or TransferConfig(
            multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_concurrency=8, use_threads=True
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _err(self, err: Exception, key: str, action: str) -> StoreError:
        return s3_error(err, f"{self.uri}/{key}", self.bucket, action)

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer)
        except Exception as err:  # botocore raises many unrelated types; all become StoreError
            raise self._err(err, key, "write") from None

    def get(self, key: str) -> bytes:
        buf = io.BytesIO()
        try:
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
        except Exception as err:
            raise self._err(err, key, "read") from None
        return buf.getvalue()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as err:
            e = self._err(err, key, "read")
            if isinstance(e, MissingObject):
                return False
            raise e from None

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        out = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out += [o["Key"] for o in page.get("Contents", [])]
        except Exception as err:
            raise self._err(err, prefix, "list") from None
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[strip:] for k in out)

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys per call
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except Exception as err:
                raise self._err(err, keys[i], "delete") from None

    def check(self, write: bool) -> None:
        """Fail early, with the reason, if the bucket is missing or the credentials cannot read (or write)."""
        # A GET, not HEAD: S3 puts the error code (NoSuchBucket, SignatureDoesNotMatch...) in the body.
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except Exception as err:
            raise s3_error(err, self.uri, self.bucket, "open bucket") from None
        if write:
            self.put(".thaw-write-check", b"ok")


def open_store(
    spec: CheckpointSpec, job_name: str, write: bool = True, credentials: tuple[str, str] | None = None
) -> Store:
    """The job's own folder under the spec's checkpoint URI, checked for access.

    A problem the user must fix (no permission, missing bucket, bad credentials) is a SpecError
    naming spec.checkpoint.uri. An unreachable server, a timeout or a 5xx may pass: they are
    retried with backoff for up to uploadTimeoutSeconds, then raised as a transient StoreError
    (the process exits 1 and the stage is retried, never failed as misconfigured)."""
    uri = spec.uri
    if uri.startswith("s3://"):
        client = s3_client(spec.endpoint, spec.region, spec.path_style, credentials)
        store = S3Store(f"{uri}/{job_name}", client)
        try:
            retrying(lambda: store.check(write), spec.upload_timeout_seconds, f"open {uri}", transient_only=True)
        except StoreError as err:
            if err.transient:
                raise
            raise SpecError(f"spec.checkpoint.uri: {err}") from None
        return store
    root = Path(uri.removeprefix("file://")).expanduser()
    try:
        (root / job_name).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpecError(f"spec.checkpoint.uri: cannot create {root / job_name}: {err.strerror}") from None
    if write and not os.access(root / job_name, os.W_OK):
        raise SpecError(f"spec.checkpoint.uri: {root / job_name} is not writable")
    return LocalStore(root.resolve() / job_name)


def delete_prefix(store: Store, prefix: str, first: str | None = None) -> None:
    """Delete every object under prefix; `first` (a manifest) goes before the rest so that a
    half-deleted checkpoint is never mistaken for a valid one."""
    keys = store.list(prefix)
    if first and f"{prefix}/{first}" in keys:
        store.delete([f"{prefix}/{first}"])
        keys.remove(f"{prefix}/{first}")
    if keys:
        store.delete(keys)
