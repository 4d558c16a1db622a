"""Thin kopf handlers: observe, call the pure planner, apply its plan.

Every FineTuneJob event and every event of a stage Job it owns queues that FineTuneJob
(thaw_operator.workqueue) for a worker to `reconcile`; a background loop queues jobs waiting
(for a failed attempt's pods, a TTL) when due and all of them every minute, behind the
event-driven ones (level-triggered: a missed event costs latency, never correctness). kopf's
`on.event` handlers keep no state in the objects, so no finalizers: deletion cascades through
ownerReferences alone, even with the operator down.

The operator never talks to the object store and holds no storage credentials: a stage's
result comes from rank 0's termination message, its live progress from rank 0's metrics
endpoint, and the next stage's pods verify the checkpoint before they load it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from datetime import UTC, datetime

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from thaw_contract.layer_table import resolve_offline
from thaw_contract.spec import SpecError, parse_job
from thaw_operator import metrics, observe
from thaw_operator import resources as res
from thaw_operator.crd import GROUP, PLURAL, VERSION
from thaw_operator.informer import Informer
from thaw_operator.planner import JobView, Plan, plan
from thaw_operator.status import TERMINAL, TIME_FORMAT
from thaw_operator.workqueue import HANDOFF, SPEC, SWEEP, WorkQueue
from thaw_operator.workqueue import NAMES as PRIORITY_NAMES

log = logging.getLogger("thaw.operator")


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
_resync_now = threading.Event()


def acting() -> bool:
    """Only the elected replica reconciles; the others keep their watches warm and wait."""
    return CONFIG.leader is None or CONFIG.leader.is_leader()


def resync_now() -> None:
    """A new leader resyncs everything at once (events it ignored while standing by)."""
    _resync_now.set()


QUEUE = WorkQueue()  # (namespace, name) keys; one worker per key at a time
_generations: dict[tuple[str, str], int] = {}  # the last FineTuneJob generation queued, per key
# The resourceVersion our last status patch produced, per key: its watch event is our own
# write coming back, and reconciling it again finds nothing new (other inputs have their own events).
_own_writes: dict[tuple[str, str], str] = {}
metrics.QUEUE_DEPTH.set_function(lambda: len(QUEUE))
_requeue: dict[tuple[str, str], float] = {}


def now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


def workloads_by_job(namespace: str) -> dict[str, dict]:
    """Kueue Workloads of the namespace, by the uid of the Job that owns each ({} without Kueue)."""
    try:
        items = client.CustomObjectsApi(CONFIG.api).list_namespaced_custom_object(
            res.KUEUE_GROUP, res.KUEUE_VERSION, namespace, res.KUEUE_WORKLOADS
        )["items"]
    except ApiException as err:
        if err.status == 404:  # Kueue is not installed
            return {}
        raise
    return {ref["uid"]: w for w in items for ref in w["metadata"].get("ownerReferences", []) if ref["kind"] == "Job"}


def _cache(caches: dict[str | None, Informer], namespace: str) -> Informer | None:
    """The synced watch cache covering `namespace`, if any."""
    inf = caches.get(namespace) or caches.get(None)
    return inf if inf is not None and inf.synced.is_set() else None


def _list_live(fn, namespace: str, selector: str) -> list[dict]:
    return json.loads(fn(namespace, label_selector=selector, _preload_content=False).data).get("items") or []


def _stage_jobs(namespace: str, name: str) -> list[dict]:
    inf = _cache(CONFIG.jobs, namespace)
    if inf is not None:
        return inf.by_label(namespace, name)
    return _list_live(client.BatchV1Api(CONFIG.api).list_namespaced_job, namespace, f"{res.LABEL_JOB}={name}")


def _stage_pods(namespace: str, name: str, live: bool = False) -> list[dict]:
    inf = None if live else _cache(CONFIG.pods, namespace)
    if inf is not None:
        return inf.by_label(namespace, name)
    return _list_live(client.CoreV1Api(CONFIG.api).list_namespaced_pod, namespace, f"{res.LABEL_JOB}={name}")


def _views(owned: list[dict], pods: list[dict], workloads: dict) -> list[JobView]:
    pods_of: dict[str | None, list[dict]] = {}
    for p in pods:
        pods_of.setdefault(observe.job_name_of(p), []).append(p)
    views = [
        observe.job_view(j, pods_of.get(j["metadata"]["name"], []), workloads.get(j["metadata"]["uid"])) for j in owned
    ]
    return [v for v in views if v is not None]


def scrape_progress(pod, port: int) -> dict | None:
    """Epoch, validation accuracy and ETA that rank 0 serves on its metrics port (best effort:
    the operator reaches only pods it created, at the address their status gives)."""
    from prometheus_client.parser import text_string_to_metric_families

    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    try:
        with _NO_PROXY.open(f"http://{ip}:{port}/metrics", timeout=2) as r:
            text = r.read(1 << 20).decode()
    except (OSError, ValueError):
        return None
    wanted = {"thaw_epoch": "epoch", "thaw_val_accuracy_ratio": "valAccuracy", "thaw_eta_seconds": "etaSeconds"}
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("rank", "0") == "0":
                out[wanted[sample.name]] = sample.value
    if "epoch" in out:
        out["epoch"] = int(out["epoch"])
    return out or None


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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
        _requeue[key] = time.monotonic() + 1.0
        return None
    except Exception as err:  # noqa: BLE001 - one broken job must not stall the others
        return _stalled(key, err)
    finally:
        metrics.RECONCILES.inc()
        metrics.RECONCILE_SECONDS.observe(time.perf_counter() - t0)
    if result is not None and result.requeue_after:
        _requeue[key] = time.monotonic() + result.requeue_after
    else:
        _requeue.pop(key, None)
    return result


def work_forever(stop: threading.Event) -> None:
    """One of the workers: reconcile keys from the queue until stopped."""
    while not stop.is_set():
        item = QUEUE.get(timeout=1.0)
        if item is None:
            continue
        key, waited, priority = item
        metrics.QUEUE_WAIT_SECONDS.labels(PRIORITY_NAMES[priority]).observe(waited)
        try:
            if acting():
                reconcile(*key)
        finally:
            QUEUE.done(key)


STALLED_RETRY_SECONDS = 10.0


def _stalled(key: tuple[str, str], err: Exception) -> None:
    metrics.RECONCILE_ERRORS.inc()
    log.warning("%s/%s: reconcile failed: %s", *key, _one_line(err))
    _report_stalled(*key, err)
    _requeue[key] = time.monotonic() + STALLED_RETRY_SECONDS


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
    custom = client.CustomObjectsApi(CONFIG.api)
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
            "lastTransitionTime": now(),
        }
        conditions = [c for c in old if c.get("type") != "Stalled"] + [cond]
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": {"conditions": conditions}}
        )
        post_event(ftj, "Warning", "ReconcileError", message)
    except Exception as again:  # noqa: BLE001 - reporting is best effort; the retry is not
        log.warning("%s/%s: could not report the failure: %s", namespace, name, _one_line(again))


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
        resolve_offline(spec)  # the trainer's plan-time checks, from the torch-free layer table
    except SpecError as err:
        spec, error = None, str(err).replace("\n", "; ")
    uid = ftj["metadata"]["uid"]
    owned = [j for j in _stage_jobs(namespace, name) if observe.owned_by(j, uid)]
    queued = any(res.KUEUE_QUEUE in (j["metadata"].get("labels") or {}) for j in owned)
    workloads = workloads_by_job(namespace) if queued else {}
    pods = _stage_pods(namespace, name)
    jobs = _views(owned, pods, workloads)
    if _cache(CONFIG.pods, namespace) is not None and observe.needs_fresh_pods(jobs, ftj.get("status") or {}):
        pods = _stage_pods(namespace, name, live=True)
        jobs = _views(owned, pods, workloads)
    progress = {}
    if spec is not None:
        latest: dict[int, JobView] = {}
        for j in jobs:
            if j.stage not in latest or j.attempt > latest[j.stage].attempt:
                latest[j.stage] = j
        for k, j in latest.items():
            if j.complete or j.failed:
                continue
            rank0 = [p for p in pods if observe.job_name_of(p) == j.name and observe.is_rank0(p, "Running")]
            found = scrape_progress(rank0[0], spec.metrics.port) if rank0 and spec.metrics.enabled else None
            if found and found.get("epoch"):
                progress[k] = found
    result = plan(ftj, spec, error, jobs, now(), CONFIG.trainer_image, progress)
    apply(ftj, result)
    return result


class NotOwned(Exception):
    """An object with a child's name exists and belongs to someone else."""


def _read(kind: str, ns: str, name: str) -> dict:
    """A child as the API server returns it (JSON, as the watch caches hold them)."""
    if kind == "Job":
        fn = client.BatchV1Api(CONFIG.api).read_namespaced_job
    elif kind == "Service":
        fn = client.CoreV1Api(CONFIG.api).read_namespaced_service
    else:
        fn = client.CoreV1Api(CONFIG.api).read_namespaced_config_map
    return json.loads(fn(name, ns, _preload_content=False).data)


def _create(obj: dict) -> None:
    """Create a child; if its deterministic name exists, it must be ours (else NotOwned)."""
    kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        if kind == "Job":
            made = client.BatchV1Api(CONFIG.api).create_namespaced_job(ns, obj, _preload_content=False)
            _remember(CONFIG.jobs, ns, json.loads(made.data))
        elif kind == "Service":
            client.CoreV1Api(CONFIG.api).create_namespaced_service(ns, obj)
        elif kind == "ConfigMap":
            client.CoreV1Api(CONFIG.api).create_namespaced_config_map(ns, obj)
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
            _remember(CONFIG.jobs, ns, existing)


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
        client.CoreV1Api(CONFIG.api).patch_namespaced_config_map(
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
        done = client.BatchV1Api(CONFIG.api).patch_namespaced_job(job, meta["namespace"], patch, _preload_content=False)
        _remember(CONFIG.jobs, meta["namespace"], json.loads(done.data))
    for workload, patch in p.patch_workloads:
        client.CustomObjectsApi(CONFIG.api).patch_namespaced_custom_object(
            res.KUEUE_GROUP, res.KUEUE_VERSION, meta["namespace"], res.KUEUE_WORKLOADS, workload, patch
        )
    for job in p.delete_jobs:
        try:
            client.BatchV1Api(CONFIG.api).delete_namespaced_job(job, meta["namespace"], propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise
    if p.status and p.status != old:
        # Conditional on the version observed: a stale plan (another replica, an older event)
        # gets 409 and is re-planned from fresh observations instead of overwriting.
        written = client.CustomObjectsApi(CONFIG.api).patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            meta["namespace"],
            PLURAL,
            meta["name"],
            {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": p.status},
        )
        _own_writes[(meta["namespace"], meta["name"])] = (written.get("metadata") or {}).get("resourceVersion")
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


def list_finetunejobs() -> list[dict]:
    api = client.CustomObjectsApi(CONFIG.api)
    if not CONFIG.namespaces:
        return api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    return [
        o for ns in CONFIG.namespaces for o in api.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
    ]


FULL_SWEEP_EVERY = 10  # resyncs


def _has_progress(ftj: dict) -> bool:
    """A running rank 0 whose metrics the sweep reads into the status (epoch, accuracy, ETA)."""
    if not ((ftj.get("spec") or {}).get("metrics") or {}).get("enabled", True):
        return False
    meta = ftj["metadata"]
    inf = _cache(CONFIG.pods, meta["namespace"])
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
        if not acting():
            continue
        due = [k for k, t in list(_requeue.items()) if t <= time.monotonic()]
        now_ = _resync_now.is_set()
        _resync_now.clear()
        try:
            if now_ or time.monotonic() - last >= CONFIG.resync_seconds:
                full = now_ or sweeps % FULL_SWEEP_EVERY == 0
                last, sweeps = time.monotonic(), sweeps + 1
                items = list_finetunejobs()
                metrics.set_phases(items)
                for o in items:
                    if _swept(o, full):
                        QUEUE.add((o["metadata"]["namespace"], o["metadata"]["name"]), SWEEP)
            for key in due:
                QUEUE.add(key, SPEC)
        except Exception:  # noqa: BLE001 - the loop must survive API hiccups
            log.exception("resync failed")


# --- kopf wiring -------------------------------------------------------------------------


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_finetunejob(type, body, namespace, name, **_):  # noqa: A002 - kopf's argument name
    key = (namespace, name)
    if type == "DELETED":
        metrics.forget(namespace, name, [s["name"] for s in (body.get("status") or {}).get("stages", [])])
        _generations.pop(key, None)
        _own_writes.pop(key, None)
        return
    generation = body["metadata"].get("generation")
    echo = _generations.get(key) == generation
    _generations[key] = generation
    if echo and body["metadata"].get("resourceVersion") == _own_writes.get(key):
        return  # exactly the status we wrote: nothing to reconcile (the event predicate)
    # Same generation otherwise: a status or metadata change by someone else (or our write seen
    # after a later one). Reconciled (level-triggered), but behind hand-offs and spec changes.
    QUEUE.add(key, SWEEP if echo else SPEC)


def on_stage_job(job: dict) -> None:
    meta = job["metadata"]
    QUEUE.add((meta["namespace"], meta["labels"][res.LABEL_JOB]), HANDOFF)


def start_watches(stop: threading.Event, namespaces: list[str]) -> None:
    """The stage Job and pod watch caches, one pair per watched namespace (or one for all).
    Filtered by label on the API server: the operator never receives other Jobs and pods
    (kopf's label filters apply client-side, after the whole stream)."""
    batch, core = client.BatchV1Api(CONFIG.api), client.CoreV1Api(CONFIG.api)
    jobs = (batch.list_namespaced_job, batch.list_job_for_all_namespaces)
    pods = (core.list_namespaced_pod, core.list_pod_for_all_namespaces)
    kinds = (  # cache, kind, (list in one namespace, in all), slim copy, on change
        (CONFIG.jobs, "Job", jobs, observe.slim_job, on_stage_job),
        (CONFIG.pods, "Pod", pods, observe.slim_pod, None),
    )
    for ns in namespaces or [None]:
        for caches, kind, (in_ns, in_all), slim, handler in kinds:
            caches[ns] = inf = Informer(
                kind, in_ns if ns else in_all, (ns,) if ns else (), slim, res.LABEL_JOB, on_change=handler
            )
            name = f"watch-{kind.lower()}s-{ns or 'all'}"
            threading.Thread(target=inf.run, args=(stop,), name=name, daemon=True).start()
