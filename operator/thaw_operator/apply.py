"""Writes a plan to the API server: children first (deterministic names, so a repeat is a
no-op and a stranger's object of the same name is refused), then the FineTuneJob's status
(conditional on the version planned from), then its Events.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from thaw_operator import metrics, observe, state
from thaw_operator import resources as res
from thaw_operator.crd import GROUP, PLURAL, VERSION
from thaw_operator.informer import Informer
from thaw_operator.planner import Plan
from thaw_operator.status import TIME_FORMAT

log = logging.getLogger("thaw.operator")


# Events that announce a Job this plan created (planner._start, planner._retry).
CREATION_EVENTS = ("StageStarted", "StageRetrying")


class NotOwned(Exception):
    """An object with a child's name exists and belongs to someone else."""


def _read(kind: str, ns: str, name: str) -> dict:
    """A child as the API server returns it (JSON, as the watch caches hold them)."""
    if kind == "Job":
        fn = client.BatchV1Api(state.CONFIG.api).read_namespaced_job
    elif kind == "Service":
        fn = client.CoreV1Api(state.CONFIG.api).read_namespaced_service
    elif kind == "PersistentVolumeClaim":
        fn = client.CoreV1Api(state.CONFIG.api).read_namespaced_persistent_volume_claim
    else:
        fn = client.CoreV1Api(state.CONFIG.api).read_namespaced_config_map
    return json.loads(fn(name, ns, _preload_content=False).data)


def _create(obj: dict) -> None:
    """Create a child; if its deterministic name exists, it must be ours (else NotOwned)."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        if kind == "Job":
            made = client.BatchV1Api(state.CONFIG.api).create_namespaced_job(ns, obj, _preload_content=False)
            _remember(state.CONFIG.jobs, ns, json.loads(made.data))
        elif kind == "Service":
            client.CoreV1Api(state.CONFIG.api).create_namespaced_service(ns, obj)
        elif kind == "ConfigMap":
            client.CoreV1Api(state.CONFIG.api).create_namespaced_config_map(ns, obj)
        elif kind == "PersistentVolumeClaim":
            client.CoreV1Api(state.CONFIG.api).create_namespaced_persistent_volume_claim(ns, obj)
        else:
            raise ValueError(f"cannot create {kind}")
    except ApiException as err:
        if err.status != 409:
            raise
        # Already there: ours from an earlier reconcile (idempotent), or a stranger's.
        uid = obj["metadata"]["ownerReferences"][0]["uid"]
        existing = _read(kind, ns, name)
        if not observe.owned_by(existing, uid):
            raise NotOwned(
                f"{kind} {ns}/{name} exists and is not owned by this FineTuneJob (uid {uid}); delete or rename it"
            ) from None
        if kind == "Job":
            _remember(state.CONFIG.jobs, ns, existing)


def _remember(caches: dict[str | None, Informer], namespace: str, obj: dict) -> None:
    """Our own write, into the watch cache at once: the next reconcile must see it even if
    the watch has not delivered it yet (else a Job just created would look deleted)."""
    inf = caches.get(namespace) or caches.get(None)
    if inf is not None:
        inf.upsert(obj)


def _ensure_config_map(ftj: dict) -> None:
    """The job file stage pods read, current with the FineTuneJob's spec before each new Job
    (mutable fields such as data.workers or metrics may have changed)."""
    want = res.config_map(ftj)
    meta = want["metadata"]
    try:
        have = _read("ConfigMap", meta["namespace"], meta["name"])
    except ApiException as err:
        if err.status != 404:
            raise
        _create(want)
        return
    if not observe.owned_by(have, ftj["metadata"]["uid"]):
        raise NotOwned(
            f"ConfigMap {meta['namespace']}/{meta['name']} exists and is not owned by this FineTuneJob; "
            "delete or rename it"
        )
    if (have.get("data") or {}) != want["data"]:
        client.CoreV1Api(state.CONFIG.api).patch_namespaced_config_map(
            meta["name"], meta["namespace"], {"data": want["data"]}
        )


def post_event(ftj: dict, kind: str, reason: str, message: str) -> None:
    meta = ftj["metadata"]
    body = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": ftj["apiVersion"],
            "kind": ftj["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        },
        "type": kind,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "thaw-operator"},
        "firstTimestamp": state.now(),
        "lastTimestamp": state.now(),
        "count": 1,
    }
    try:
        client.CoreV1Api(state.CONFIG.api).create_namespaced_event(meta["namespace"], body)
    except ApiException as err:  # events are best effort
        log.warning("event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], err.reason)


def apply(ftj: dict, p: Plan) -> None:
    meta = ftj["metadata"]
    old = ftj.get("status") or {}
    # Children first (deterministic names: a repeat is a no-op), then status: a status that
    # names attempt n never exists without attempt n's Job.
    if p.create:
        _ensure_config_map(ftj)
        for obj in p.create:
            _create(obj)
            if obj["kind"] == "Job":
                metrics.JOBS_CREATED.inc()
    for job, patch in p.patch_jobs:
        done = client.BatchV1Api(state.CONFIG.api).patch_namespaced_job(
            job, meta["namespace"], patch, _preload_content=False
        )
        _remember(state.CONFIG.jobs, meta["namespace"], json.loads(done.data))
    for workload, patch in p.patch_workloads:
        client.CustomObjectsApi(state.CONFIG.api).patch_namespaced_custom_object(
            res.KUEUE_GROUP, res.KUEUE_VERSION, meta["namespace"], res.KUEUE_WORKLOADS, workload, patch
        )
    for job in p.delete_jobs:
        try:
            client.BatchV1Api(state.CONFIG.api).delete_namespaced_job(
                job, meta["namespace"], propagation_policy="Background"
            )
        except ApiException as err:
            if err.status != 404:
                raise
    if p.status and p.status != old:
        # Conditional on the version observed: a stale plan (another replica, an older event)
        # gets 409 and is re-planned from fresh observations instead of overwriting.
        try:
            written = client.CustomObjectsApi(state.CONFIG.api).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": p.status},
            )
        except ApiException as err:
            if err.status == 409:  # the Jobs above exist now: the re-plan will not announce them again
                for kind, reason, message in p.events:
                    if reason in CREATION_EVENTS:
                        post_event(ftj, kind, reason, message)
            raise
        state.own_writes[(meta["namespace"], meta["name"])] = (written.get("metadata") or {}).get("resourceVersion")
        _record_transitions(old, p.status)
    if p.status.get("stages"):
        metrics.set_attempts(meta["namespace"], meta["name"], p.status["stages"])
    for kind, reason, message in p.events:
        post_event(ftj, kind, reason, message)
        log.info("%s/%s %s: %s", meta["namespace"], meta["name"], reason, message)


def _record_transitions(old: dict, new: dict) -> None:
    before = {s["index"]: s.get("phase") for s in old.get("stages", [])}
    for s in new.get("stages", []):
        if before.get(s["index"]) != s["phase"]:
            metrics.STAGE_TRANSITIONS.labels(s["phase"]).inc()
            if s["phase"] == "Succeeded" and s.get("startTime") and s.get("completionTime"):
                parse = lambda t: datetime.strptime(t, TIME_FORMAT)
                seconds = (parse(s["completionTime"]) - parse(s["startTime"])).total_seconds()
                metrics.STAGE_SECONDS.observe(max(seconds, 0))
