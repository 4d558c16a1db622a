"""Thin kopf handlers: observe, call the pure planner, apply its plan.

Every FineTuneJob event and every event of a stage Job it owns triggers `reconcile` for that
FineTuneJob; a background loop re-runs it for jobs waiting on a checkpoint and resyncs all of
them every minute (level-triggered: a missed event costs latency, never correctness). kopf's
`on.event` handlers keep no state in the objects, so no finalizers: deletion cascades through
ownerReferences alone, even with the operator down.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from datetime import UTC, datetime

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from thaw_operator import metrics
from thaw_operator import resources as res
from thaw_operator.crd import GROUP, PLURAL, VERSION
from thaw_operator.planner import TERMINAL, FinalView, JobView, Plan, plan
from trainer.plan import stage_names
from trainer.spec import FineTuneJobSpec, SpecError, parse_job

log = logging.getLogger("thaw.operator")


class Config:
    trainer_image = "ghcr.io/thaw-dev/thaw-trainer:0.1.0"
    resync_seconds = 60.0
    namespaces: list[str] = []  # empty: cluster-wide
    api: client.ApiClient | None = None


CONFIG = Config()
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()
_requeue: dict[tuple[str, str], float] = {}


def _lock(key: tuple[str, str]) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_view(job) -> JobView | None:
    labels = job.metadata.labels or {}
    try:
        stage, attempt = int(labels[res.LABEL_STAGE]), int(labels[res.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    conds = {c.type: c for c in (job.status.conditions or []) if c.status == "True"}
    failed = conds.get("Failed")
    ts = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ") if t else None
    return JobView(
        name=job.metadata.name,
        stage=stage,
        attempt=attempt,
        suspended=bool(job.spec.suspend),
        suspended_by_operator=(job.metadata.annotations or {}).get(res.ANNOTATION_SUSPENDED) == "true",
        active=job.status.active or 0,
        complete="Complete" in conds,
        failed=failed is not None,
        failed_reason=(failed.reason or "") if failed else "",
        failed_message=(failed.message or "") if failed else "",
        start_time=ts(job.status.start_time),
        completion_time=ts(job.status.completion_time),
    )


def _credentials(namespace: str, spec: FineTuneJobSpec) -> tuple[str, str] | None:
    name = spec.checkpoint.credentials_secret
    if not name or not spec.checkpoint.uri.startswith("s3://"):
        return None
    secret = client.CoreV1Api(CONFIG.api).read_namespaced_secret(name, namespace)
    data = secret.data or {}
    return tuple(base64.b64decode(data[k]).decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))


def verified_finals(namespace: str, name: str, spec: FineTuneJobSpec, stages: list[int]) -> dict[int, FinalView]:
    """Final checkpoints of the given stages that verify in the store (sizes and sha256)."""
    if not stages:
        return {}
    from trainer import checkpoint as ckpt
    from trainer.storage import open_store

    names = stage_names(spec)
    out = {}
    try:
        store = open_store(spec.checkpoint, name, write=False, credentials=_credentials(namespace, spec))
        for k in stages:
            pointer = ckpt.read_pointer(store, k, names[k])
            if pointer is not None and ckpt.verify(store, pointer["checkpoint"]) is not None:
                out[k] = FinalView(f"{store.uri}/{pointer['checkpoint']}", pointer.get("metrics", {}))
    except (SpecError, OSError, ckpt.CheckpointError, ApiException, KeyError) as err:
        log.warning("%s/%s: cannot verify checkpoints yet: %s", namespace, name, err)
    return out


def stage_progress(namespace: str, name: str, spec: FineTuneJobSpec, running: list[int]) -> dict[int, dict]:
    """Epoch, validation accuracy and ETA of running stages, from their newest epoch manifest."""
    if not running:
        return {}
    from trainer import checkpoint as ckpt
    from trainer.storage import open_store

    names = stage_names(spec)
    out = {}
    try:
        store = open_store(spec.checkpoint, name, write=False, credentials=_credentials(namespace, spec))
        for k in running:
            manifest = ckpt.latest_manifest(store, k, names[k])
            if manifest is not None:
                row = manifest.get("metrics", {})
                out[k] = {
                    "epoch": manifest.get("epoch", 0) + 1,
                    "valAccuracy": row.get("val_accuracy"),
                    "etaSeconds": row.get("eta_seconds"),
                }
    except (SpecError, OSError, ApiException, KeyError) as err:
        log.debug("%s/%s: no progress yet: %s", namespace, name, err)
    return out


def reconcile(namespace: str, name: str) -> Plan | None:
    key = (namespace, name)
    with _lock(key):
        t0 = time.perf_counter()
        try:
            result = _reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            raise
        finally:
            metrics.RECONCILES.inc()
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)
        if result is not None and result.requeue_after:
            _requeue[key] = time.monotonic() + result.requeue_after
        else:
            _requeue.pop(key, None)
        return result


def _reconcile(namespace: str, name: str) -> Plan | None:
    custom = client.CustomObjectsApi(CONFIG.api)
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
    except SpecError as err:
        spec, error = None, str(err).replace("\n", "; ")
    batch = client.BatchV1Api(CONFIG.api)
    uid = ftj["metadata"]["uid"]
    jobs = []
    for j in batch.list_namespaced_job(namespace, label_selector=f"{res.LABEL_JOB}={name}").items:
        if any(o.uid == uid for o in j.metadata.owner_references or []):
            view = job_view(j)
            if view is not None:
                jobs.append(view)
    finals: dict[int, FinalView] = {}
    if spec is not None:
        done = {s["index"] for s in (ftj.get("status") or {}).get("stages", []) if s.get("phase") == "Succeeded"}
        latest: dict[int, JobView] = {}
        for j in jobs:
            if j.stage not in latest or j.attempt > latest[j.stage].attempt:
                latest[j.stage] = j
        to_verify = sorted(k for k, j in latest.items() if j.complete and k not in done)
        finals = verified_finals(namespace, name, spec, to_verify)
        running = sorted(k for k, j in latest.items() if not (j.complete or j.failed) and k not in done)
        progress = stage_progress(namespace, name, spec, running)
    else:
        progress = {}
    result = plan(ftj, spec, error, jobs, finals, now(), CONFIG.trainer_image, progress)
    apply(ftj, result)
    return result


def _create(obj: dict) -> None:
    kind, ns = obj["kind"], obj["metadata"]["namespace"]
    try:
        if kind == "Job":
            client.BatchV1Api(CONFIG.api).create_namespaced_job(ns, obj)
        elif kind == "Service":
            client.CoreV1Api(CONFIG.api).create_namespaced_service(ns, obj)
        elif kind == "ConfigMap":
            client.CoreV1Api(CONFIG.api).create_namespaced_config_map(ns, obj)
        else:
            raise ValueError(f"cannot create {kind}")
    except ApiException as err:
        if err.status != 409:  # already there: deterministic names make creation idempotent
            raise


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
        "firstTimestamp": now(),
        "lastTimestamp": now(),
        "count": 1,
    }
    try:
        client.CoreV1Api(CONFIG.api).create_namespaced_event(meta["namespace"], body)
    except ApiException as err:  # events are best effort
        log.warning("event %s for %s/%s not posted: %s", reason, meta["namespace"], meta["name"], err.reason)


def apply(ftj: dict, p: Plan) -> None:
    meta = ftj["metadata"]
    if p.create:
        _create(res.config_map(ftj))
        for obj in p.create:
            _create(obj)
            if obj["kind"] == "Job":
                metrics.JOBS_CREATED.inc()
    for job, patch in p.patch_jobs:
        client.BatchV1Api(CONFIG.api).patch_namespaced_job(job, meta["namespace"], patch)
    old = ftj.get("status") or {}
    if p.status and p.status != old:
        client.CustomObjectsApi(CONFIG.api).patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], {"status": p.status}
        )
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
                parse = lambda t: datetime.strptime(t, "%Y-%m-%dT%H:%M:%SZ")
                seconds = (parse(s["completionTime"]) - parse(s["startTime"])).total_seconds()
                metrics.STAGE_SECONDS.observe(max(seconds, 0))


def list_finetunejobs() -> list[dict]:
    api = client.CustomObjectsApi(CONFIG.api)
    if not CONFIG.namespaces:
        return api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    return [
        o for ns in CONFIG.namespaces for o in api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    ]


def resync_forever(stop: threading.Event) -> None:
    """Requeued jobs (checkpoint not verified yet) when due; everything every resync_seconds."""
    last_full = time.monotonic()
    while not stop.wait(1.0):
        due = [k for k, t in list(_requeue.items()) if t <= time.monotonic()]
        full = time.monotonic() - last_full >= CONFIG.resync_seconds
        try:
            if full:
                last_full = time.monotonic()
                items = list_finetunejobs()
                metrics.set_phases(items)
                due = sorted(
                    {
                        *due,
                        *(
                            (o["metadata"]["namespace"], o["metadata"]["name"])
                            for o in items
                            if (o.get("status") or {}).get("phase") not in TERMINAL
                        ),
                    }
                )
            for ns, name in due:
                reconcile(ns, name)
        except Exception:  # noqa: BLE001 - the loop must survive API hiccups
            log.exception("resync failed")


# --- kopf wiring -------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetunejob(type, body, namespace, name, **_):  # noqa: A002 - kopf's argument name
    if type == "DELETED":
        metrics.forget(namespace, name, [s["name"] for s in (body.get("status") or {}).get("stages", [])])
        return
    reconcile(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={res.LABEL_JOB: kopf.PRESENT})
def on_stage_job(body, namespace, **_):
    owner = body["metadata"]["labels"][res.LABEL_JOB]
    reconcile(namespace, owner)
