"""What queues a FineTuneJob for reconciling: its own watch events (kopf), its stage Jobs'
watch events (the watch caches), due requeues, and the periodic resync sweep.
"""

from __future__ import annotations

import logging
import threading
import time

import kopf
from kubernetes import client

from thaw_operator import metrics, observe, state
from thaw_operator import resources as res
from thaw_operator.crd import GROUP, PLURAL, VERSION
from thaw_operator.informer import Informer
from thaw_operator.status import TERMINAL
from thaw_operator.workqueue import HANDOFF, SPEC, SWEEP

log = logging.getLogger("thaw.operator")


def list_finetunejobs() -> list[dict]:
    api = client.CustomObjectsApi(state.CONFIG.api)
    if not state.CONFIG.namespaces:
        return api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    return [
        o
        for ns in state.CONFIG.namespaces
        for o in api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    ]


FULL_SWEEP_EVERY = 10  # resyncs


def _has_progress(ftj: dict) -> bool:
    """A running rank 0 whose metrics the sweep reads into the status (epoch, accuracy, ETA)."""
    if not ((ftj.get("spec") or {}).get("metrics") or {}).get("enabled", True):
        return False
    meta = ftj["metadata"]
    inf = state.synced_cache(state.CONFIG.pods, meta["namespace"])
    if inf is None:
        return True  # no cache yet: assume so
    return any(observe.is_rank0(p, "Running") for p in inf.by_label(meta["namespace"], meta["name"]))


def _swept(ftj: dict, full: bool) -> bool:
    status, spec = ftj.get("status") or {}, ftj.get("spec") or {}
    if status.get("phase") in TERMINAL:
        return full and (spec.get("runPolicy") or {}).get("ttlSecondsAfterFinished") is not None
    return full or _has_progress(ftj)


def resync_forever(stop: threading.Event) -> None:
    """Queues requeued jobs (waiting for pods to stop, a TTL, a stalled one) when due, and every
    resync_seconds the jobs with live progress to read. Every FULL_SWEEP_EVERY resyncs (and when
    this replica starts leading) all unfinished ones, and finished ones with a TTL: the safety
    net for a missed event, which the watches make rare. Sweeps go behind event-driven keys.
    (Sweeping every job every minute cost 1,000 jobs four busy workers and a queue that never
    emptied: docs/benchmarks.md.)"""
    last, sweeps = time.monotonic(), 0
    while not stop.wait(1.0):
        if not state.acting():
            continue
        due = [k for k, t in list(state.requeue.items()) if t <= time.monotonic()]
        now_ = state.resync_requested.is_set()
        state.resync_requested.clear()
        try:
            if now_ or time.monotonic() - last >= state.CONFIG.resync_seconds:
                full = now_ or sweeps % FULL_SWEEP_EVERY == 0
                last, sweeps = time.monotonic(), sweeps + 1
                items = list_finetunejobs()
                metrics.set_phases(items)
                for o in items:
                    if _swept(o, full):
                        state.QUEUE.add((o["metadata"]["namespace"], o["metadata"]["name"]), SWEEP)
            for key in due:
                state.QUEUE.add(key, SPEC)
        except Exception:  # noqa: BLE001 - the loop must survive API hiccups
            log.exception("resync failed")


# --- kopf wiring -------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetunejob(type, body, namespace, name, **_):  # noqa: A002 - kopf's argument name
    key = (namespace, name)
    if type == "DELETED":
        metrics.forget(namespace, name, [s["name"] for s in (body.get("status") or {}).get("stages", [])])
        state.generations.pop(key, None)
        state.own_writes.pop(key, None)
        return
    generation = body["metadata"].get("generation")
    echo = state.generations.get(key) == generation
    state.generations[key] = generation
    if echo and body["metadata"].get("resourceVersion") == state.own_writes.get(key):
        return  # exactly the status we wrote: nothing to reconcile (the event predicate)
    # Same generation otherwise: a status or metadata change by someone else (or our write seen
    # after a later one). Reconciled (level-triggered), but behind hand-offs and spec changes.
    state.QUEUE.add(key, SWEEP if echo else SPEC)


def on_stage_job(job: dict) -> None:
    meta = job["metadata"]
    state.QUEUE.add((meta["namespace"], meta["labels"][res.LABEL_JOB]), HANDOFF)


def on_stage_pod(pod: dict) -> None:
    """A stage pod's slim copy changed (observe.slim_pod keeps what the planner reads): among
    others, a container stuck waiting (an image that cannot be pulled, a missing Secret) or a
    pod the scheduler cannot place, which no Job event announces. Behind hand-offs and specs."""
    meta = pod["metadata"]
    job = (meta.get("labels") or {}).get(res.LABEL_JOB)
    if job:
        state.QUEUE.add((meta["namespace"], job), SWEEP)


def start_watches(stop: threading.Event, namespaces: list[str]) -> None:
    """The stage Job and pod watch caches, one pair per watched namespace (or one for all).
    Filtered by label on the API server: the operator never receives other Jobs and pods
    (kopf's label filters apply client-side, after the whole stream)."""
    batch, core = client.BatchV1Api(state.CONFIG.api), client.CoreV1Api(state.CONFIG.api)
    jobs = (batch.list_namespaced_job, batch.list_job_for_all_namespaces)
    pods = (core.list_namespaced_pod, core.list_pod_for_all_namespaces)
    kinds = (  # cache, kind, (list in one namespace, in all), slim copy, on change
        (state.CONFIG.jobs, "Job", jobs, observe.slim_job, on_stage_job),
        (state.CONFIG.pods, "Pod", pods, observe.slim_pod, on_stage_pod),
    )
    for ns in namespaces or [None]:
        for caches, kind, (in_ns, in_all), slim, handler in kinds:
            caches[ns] = inf = Informer(
                kind, in_ns if ns else in_all, (ns,) if ns else (), slim, res.LABEL_JOB, on_change=handler
            )
            name = f"watch-{kind.lower()}s-{ns or 'all'}"
            threading.Thread(target=inf.run, args=(stop,), name=name, daemon=True).start()
