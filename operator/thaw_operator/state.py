"""The operator's process-wide state, shared by the reconcile workers (controller.py), what
writes their plans (apply.py) and what queues them (events.py): configuration, the work queue,
requeue times, and which replica acts.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from kubernetes import client

from thaw_operator import metrics
from thaw_operator.informer import Informer
from thaw_operator.status import TIME_FORMAT
from thaw_operator.workqueue import WorkQueue


class Config:
    trainer_image = "ghcr.io/thaw-dev/thaw-trainer:0.1.0"
    resync_seconds = 60.0
    namespaces: list[str] = []  # empty: cluster-wide
    api: client.ApiClient | None = None
    leader = None  # a LeaderElector; None: the only replica
    # Watch caches of stage Jobs and pods, by namespace (None: all); empty: list live each time.
    jobs: dict[str | None, Informer] = {}
    pods: dict[str | None, Informer] = {}


CONFIG = Config()
resync_requested = threading.Event()


def acting() -> bool:
    """Only the elected replica reconciles; the others keep their watches warm and wait."""
    return CONFIG.leader is None or CONFIG.leader.is_leader()


def resync_now() -> None:
    """A new leader resyncs everything at once (events it ignored while standing by)."""
    resync_requested.set()


QUEUE = WorkQueue()  # (namespace, name) keys; one worker per key at a time
generations: dict[tuple[str, str], int] = {}  # the last FineTuneJob generation queued, per key
# The resourceVersion our last status patch produced, per key: its watch event is our own
# write coming back, and reconciling it again finds nothing new (other inputs have their own events).
own_writes: dict[tuple[str, str], str] = {}
metrics.QUEUE_DEPTH.set_function(lambda: len(QUEUE))
requeue: dict[tuple[str, str], float] = {}  # key -> when (monotonic) to reconcile it again


def now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def synced_cache(caches: dict[str | None, Informer], namespace: str) -> Informer | None:
    """The synced watch cache covering `namespace`, if any."""
    inf = caches.get(namespace) or caches.get(None)
    return inf if inf is not None and inf.synced.is_set() else None
