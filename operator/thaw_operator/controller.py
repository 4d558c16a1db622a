"""The reconcile workers: observe a FineTuneJob's stage Jobs and pods, call the pure planner,
apply its plan (apply.py).

Every FineTuneJob event and every event of a stage Job it owns queues that FineTuneJob
(events.py, thaw_operator.workqueue) for a worker to `reconcile`; a background loop queues jobs
waiting (for a failed attempt's pods, a TTL) when due, and sweeps them, behind the event-driven
ones (level-triggered: a missed event costs latency, never correctness). kopf's
`on.event` handlers keep no state in the objects, so no finalizers: deletion cascades through
ownerReferences alone, even with the operator down.

The operator never talks to the object store and holds no storage credentials: a stage's
result comes from rank 0's termination message, its live progress from rank 0's metrics
endpoint, and the next stage's pods verify the checkpoint before they load it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from thaw_contract.layer_table import resolve_offline
from thaw_contract.spec import SpecError, parse_job
from thaw_operator import metrics, observe, state, status
from thaw_operator import resources as res
from thaw_operator.apply import apply, post_event
from thaw_operator.crd import GROUP, PLURAL, VERSION
from thaw_operator.planner import JobView, Plan, plan
from thaw_operator.progress import scrape_progress
from thaw_operator.workqueue import NAMES as PRIORITY_NAMES

log = logging.getLogger("thaw.operator")


def workloads_by_job(namespace: str) -> dict[str, dict]:
    """Kueue Workloads of the namespace, by the uid of the Job that owns each ({} without Kueue)."""
    try:
        items = client.CustomObjectsApi(state.CONFIG.api).list_namespaced_custom_object(
            res.KUEUE_GROUP, res.KUEUE_VERSION, namespace, res.KUEUE_WORKLOADS
        )["items"]
    except ApiException as err:
        if err.status == 404:  # Kueue is not installed
            return {}
        raise
    return {ref["uid"]: w for w in items for ref in w["metadata"].get("ownerReferences", []) if ref["kind"] == "Job"}


def _list_live(fn, namespace: str, selector: str) -> list[dict]:
    return json.loads(fn(namespace, label_selector=selector, _preload_content=False).data).get("items") or []


def _stage_jobs(namespace: str, name: str) -> list[dict]:
    inf = state.synced_cache(state.CONFIG.jobs, namespace)
    if inf is not None:
        return inf.by_label(namespace, name)
    return _list_live(client.BatchV1Api(state.CONFIG.api).list_namespaced_job, namespace, f"{res.LABEL_JOB}={name}")


def _stage_pods(namespace: str, name: str, live: bool = False) -> list[dict]:
    inf = None if live else state.synced_cache(state.CONFIG.pods, namespace)
    if inf is not None:
        return inf.by_label(namespace, name)
    return _list_live(client.CoreV1Api(state.CONFIG.api).list_namespaced_pod, namespace, f"{res.LABEL_JOB}={name}")


def _views(owned: list[dict], pods: list[dict], workloads: dict) -> tuple[list[JobView], list[str]]:
    """The stage Jobs as the planner sees them (each with the pods it controls), and the names
    of pods that carry a stage Job's labels without being its."""
    pods_of, foreign = observe.split_pods(owned, pods)
    views = []
    for j in owned:
        view = observe.job_view(j, pods_of.get(j["metadata"]["name"], []), workloads.get(j["metadata"]["uid"]))
        if view is None:
            continue
        if not (pods_of.get(view.name) or view.complete or view.failed or view.suspended) and _age(j) > 3:
            # No pod at all: where the API server refuses them, only the Job's events say why.
            view = dataclasses.replace(view, not_starting=_refused_pods(j))
        views.append(view)
    return views, foreign


def _age(obj: dict) -> float:
    """Seconds since the object was created (0 if it does not say)."""
    made = obj["metadata"].get("creationTimestamp")
    return status.seconds(state.now()) - status.seconds(made) if made else 0.0


def _refused_pods(job: dict) -> str:
    """Why a Job has no pods, from the Job controller's FailedCreate events ("" if none)."""
    meta = job["metadata"]
    selector = f"involvedObject.kind=Job,involvedObject.uid={meta['uid']},reason=FailedCreate"
    try:
        found = client.CoreV1Api(state.CONFIG.api).list_namespaced_event(meta["namespace"], field_selector=selector)
    except ApiException as err:  # reading why is best effort; the job itself is unaffected
        log.warning("%s/%s: events not read: %s", meta["namespace"], meta["name"], err.reason)
        return ""
    stamps = [(str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp), e.message) for e in found.items]
    return observe.refused_pods(meta["name"], stamps)


def reconcile(namespace: str, name: str) -> Plan | None:
    """Observe, plan, apply one FineTuneJob. Its errors stay its own: they are logged, counted,
    reported on it (a Stalled condition and an Event) and retried, never raised to the caller."""
    key = (namespace, name)
    t0 = time.perf_counter()
    result = None
    try:
        result = _reconcile(namespace, name)
    except ApiException as err:
        if err.status != 409:
            return _stalled(key, err)
        # The FineTuneJob changed since it was read (a spec edit, another writer): plan
        # again from fresh observations, soon; nothing is wrong with it.
        log.info("%s/%s: changed while reconciling; again in 1 s", namespace, name)
        state.requeue[key] = time.monotonic() + 1.0
        return None
    except Exception as err:  # noqa: BLE001 - one broken job must not stall the others
        return _stalled(key, err)
    finally:
        metrics.RECONCILES.inc()
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)
    if result is not None and result.requeue_after:
        state.requeue[key] = time.monotonic() + result.requeue_after
    else:
        state.requeue.pop(key, None)
    return result


def work_forever(stop: threading.Event) -> None:
    """One of the workers: reconcile keys from the queue until stopped."""
    while not stop.is_set():
        item = state.QUEUE.get(timeout=1.0)
        if item is None:
            continue
        key, waited, priority = item
        metrics.QUEUE_WAIT_SECONDS.labels(PRIORITY_NAMES[priority]).observe(waited)
        try:
            if state.acting():
                reconcile(*key)
        finally:
            state.QUEUE.done(key)


STALLED_RETRY_SECONDS = 10.0


def _stalled(key: tuple[str, str], err: Exception) -> None:
    metrics.RECONCILE_ERRORS.inc()
    log.warning("%s/%s: reconcile failed: %s", *key, _one_line(err))
    _report_stalled(*key, err)
    state.requeue[key] = time.monotonic() + STALLED_RETRY_SECONDS


def _one_line(err: Exception) -> str:
    if isinstance(err, ApiException):
        try:
            return f"{err.status} {err.reason}: {json.loads(err.body).get('message', '')}"[:500]
        except (TypeError, ValueError):
            return f"{err.status} {err.reason}"
    return (str(err).splitlines() or [type(err).__name__])[0][:500]


def _report_stalled(namespace: str, name: str, err: Exception) -> None:
    """A Stalled condition and a Warning Event on the FineTuneJob that cannot progress."""
    message = f"cannot reconcile: {_one_line(err)}; retrying every {STALLED_RETRY_SECONDS:g}s"
    custom = client.CustomObjectsApi(state.CONFIG.api)
    try:
        ftj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        old = (ftj.get("status") or {}).get("conditions", [])
        prev = next((c for c in old if c.get("type") == "Stalled"), None)
        if prev and prev.get("status") == "True" and prev.get("message") == message:
            return  # already said
        cond = {
            "type": "Stalled",
            "status": "True",
            "reason": "ReconcileError",
            "message": message,
            "lastTransitionTime": state.now(),
        }
        conditions = [c for c in old if c.get("type") != "Stalled"] + [cond]
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": {"conditions": conditions}}
        )
        post_event(ftj, "Warning", "ReconcileError", message)
    except Exception as again:  # noqa: BLE001 - reporting is best effort; the retry is not
        log.warning("%s/%s: could not report the failure: %s", namespace, name, _one_line(again))


def _reconcile(namespace: str, name: str) -> Plan | None:
    custom = client.CustomObjectsApi(state.CONFIG.api)
    try:
        ftj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise
    if ftj["metadata"].get("deletionTimestamp"):
        return None
    try:
        spec, error = parse_job(ftj).spec, None
        resolve_offline(spec)  # the trainer's plan-time checks, from the torch-free layer table
    except SpecError as err:
        spec, error = None, str(err).replace("\n", "; ")
    uid = ftj["metadata"]["uid"]
    owned = [j for j in _stage_jobs(namespace, name) if observe.owned_by(j, uid)]
    queued = any(res.KUEUE_QUEUE in (j["metadata"].get("labels") or {}) for j in owned)
    workloads = workloads_by_job(namespace) if queued else {}
    pods = _stage_pods(namespace, name)
    jobs, foreign = _views(owned, pods, workloads)
    if state.synced_cache(state.CONFIG.pods, namespace) is not None and observe.needs_fresh_pods(
        jobs, ftj.get("status") or {}
    ):
        pods = _stage_pods(namespace, name, live=True)
        jobs, foreign = _views(owned, pods, workloads)
    progress = {}
    if spec is not None:
        latest: dict[int, JobView] = {}
        for j in jobs:
            if j.stage not in latest or j.attempt > latest[j.stage].attempt:
                latest[j.stage] = j
        for k, j in latest.items():
            if j.complete or j.failed:
                continue
            rank0 = [
                p
                for p in pods
                if observe.job_name_of(p) == j.name
                and observe.is_rank0(p, "Running")
                and p["metadata"]["name"] not in foreign
            ]
            found = scrape_progress(rank0[0], spec.metrics.port) if rank0 and spec.metrics.enabled else None
            if found and found.get("epoch"):
                progress[k] = found
    result = plan(ftj, spec, error, jobs, state.now(), state.CONFIG.trainer_image, progress, foreign)
    apply(ftj, result)
    return result
