"""Checkpoint writing off the training loop's critical path.

`save` blocks only while the state is copied to host memory; one background thread encodes,
uploads (objects, then the manifest) and retries with exponential backoff for as long as
`upload_timeout_seconds`, so training goes on while the store is briefly unreachable. At
most `max_pending` host copies wait; beyond that `save` waits (bounded memory). `flush`
waits for everything queued; the runner then checks that the stage's final checkpoint
committed and fails the process if not.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from thaw_contract.spec import CheckpointSpec
from trainer import checkpoint as ckpt
from trainer.storage import Store, StoreError, backoff_seconds, retrying

__all__ = ["CheckpointWriter", "backoff_seconds", "retrying", "to_host"]

log = logging.getLogger(__name__)


def to_host(obj: Any) -> Any:
    """A deep copy in CPU memory: tensors cloned off the device, containers rebuilt."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_host(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class _Job:
    prefix: str
    objects: dict[str, Any]
    meta: dict
    after_commit: Callable[[dict], None] | None


class CheckpointWriter:
    """spec: asynchronous, maxPending and uploadTimeoutSeconds of spec.checkpoint (its defaults
    when not given: one source for them)."""

    def __init__(
        self,
        store: Store,
        spec: CheckpointSpec | None = None,
        metrics=None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        spec = spec or CheckpointSpec()
        self.store = store
        self.asynchronous = spec.asynchronous
        self.timeout_seconds = spec.upload_timeout_seconds
        self.metrics = metrics
        self.sleep = sleep
        self.committed: dict[str, dict] = {}  # prefix -> manifest
        self.failed: dict[str, str] = {}  # prefix -> last error
        self.trusted: set[str] = set()  # prefixes known to verify (for retention), touched by one thread
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=spec.max_pending)
        self._thread: threading.Thread | None = None

    def save(self, prefix: str, objects: dict[str, Any], meta: dict, after_commit=None) -> float:
        """Snapshot and hand over; returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        job = _Job(prefix, to_host(objects) if self.asynchronous else objects, meta, after_commit)
        if self.asynchronous:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._queue.put(job)
        else:
            self._write(job)
        blocked = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.checkpoint_blocked(blocked)
        return blocked

    def flush(self) -> None:
        if self._thread is not None:
            self._queue.join()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._write(job)
            except Exception as err:  # the thread must outlive any one checkpoint
                log.exception("checkpoint %s: unexpected error", job.prefix)
                self.failed[job.prefix] = f"unexpected error: {err}"
            finally:
                self._queue.task_done()

    def _write(self, job: _Job) -> None:
        t0 = time.perf_counter()
        blobs = ckpt.encode(job.objects)
        job.objects = {}  # the host copy is no longer needed
        size = sum(len(b) for b in blobs.values())
        on_failure = self.metrics.upload_failed if self.metrics is not None else None
        try:
            manifest = retrying(
                lambda: ckpt.commit(self.store, job.prefix, blobs, job.meta),
                self.timeout_seconds,
                f"checkpoint {job.prefix}",
                on_failure,
                self.sleep,
            )
        except StoreError as err:
            self.failed[job.prefix] = str(err)
            log.error("checkpoint %s not committed: %s", job.prefix, err)
            return
        self.committed[job.prefix] = manifest
        self.trusted.add(job.prefix)
        if self.metrics is not None:
            self.metrics.upload_done(time.perf_counter() - t0, size)
        if job.after_commit is not None:
            try:
                job.after_commit(manifest)
            except StoreError as err:  # retention is best effort; the checkpoint itself is safe
                log.warning("after committing %s: %s", job.prefix, err)
