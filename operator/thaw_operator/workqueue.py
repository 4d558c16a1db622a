"""The reconcile work queue: which FineTuneJobs to reconcile next, and in what order.

client-go's workqueue semantics, which controller-runtime and JobSet rely on: a key is queued at
most once (a burst of events for one FineTuneJob costs one reconcile), never handed to two
workers at once (a key added while it is being reconciled is queued again when that finishes),
and watch threads only add keys, so a slow reconcile never stalls a watch.

One addition, priorities, so that work in progress is never stuck behind new work (measured in
docs/benchmarks.md: with one FIFO, stage hand-offs waited behind 1,000 new jobs' first
reconciles and behind every resync sweep):
  HANDOFF  a stage Job changed: a stage finished, failed or started (GPUs are held meanwhile);
  SPEC     a FineTuneJob is new or its spec changed, or a requeue it asked for is due;
  SWEEP    the periodic resync, and FineTuneJob events that only echo our own status patch.
A key queued at a lower priority moves up when an event of a higher one arrives.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable

HANDOFF, SPEC, SWEEP = 0, 1, 2
NAMES = ("handoff", "spec", "sweep")  # the priority label of thaw_operator_queue_wait_seconds


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._levels: tuple[deque, ...] = (deque(), deque(), deque())
        self._queued: dict[Hashable, tuple[int, float]] = {}  # key -> (priority, when first queued)
        self._active: set = set()
        self._again: dict[Hashable, int] = {}  # added while being reconciled -> best priority asked

    def add(self, key: Hashable, priority: int = SPEC) -> None:
        with self._cond:
            if key in self._active:
                self._again[key] = min(priority, self._again.get(key, SWEEP))
                return
            if key in self._queued:
                queued_at, _ = self._queued[key]
                if priority >= queued_at:
                    return
                self._levels[queued_at].remove(key)  # O(n), only when an event overtakes a sweep
                self._queued[key] = (priority, time.monotonic())  # its wait counts from the event
                self._levels[priority].append(key)
                return
            self._queued[key] = (priority, time.monotonic())
            self._levels[priority].append(key)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> tuple[Hashable, float, int] | None:
        """The next key, how long it waited and at what priority it was taken; None on timeout.
        Call done(key) after."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queued, timeout):
                return None
            priority = next(i for i, q in enumerate(self._levels) if q)
            key = self._levels[priority].popleft()
            self._active.add(key)
            return key, time.monotonic() - self._queued.pop(key)[1], priority

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._again:
                self.add(key, self._again.pop(key))

    def __len__(self) -> int:
        with self._cond:
            return len(self._queued)
