"""What the planner is told about a stage Job and its pods, read from their JSON (pure).

The operator reads Jobs and pods as the API server sends them (plain JSON, no client models),
whether from its watch caches (thaw_operator.informer) or from a live list, so both paths give
the planner the same JobView. `slim_job` and `slim_pod` keep only the fields read here: a cache
of thousands of stage pods holds a few hundred bytes each instead of their whole spec.
"""

from __future__ import annotations

import json
import re

from thaw_operator import resources as res
from thaw_operator.planner import JobView

POD_DONE = ("Succeeded", "Failed")
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


# The labels and annotations read here (stage pods carry the user's podAnnotations too: a
# slim copy leaves them out).
LABELS = (res.LABEL_JOB, res.LABEL_STAGE, res.LABEL_ATTEMPT, res.KUEUE_QUEUE, *JOB_NAME_LABELS)
ANNOTATIONS = (res.ANNOTATION_SUSPENDED, INDEX_ANNOTATION)


def _meta(obj: dict) -> dict:
    m = obj.get("metadata") or {}
    labels, annotations = m.get("labels") or {}, m.get("annotations") or {}
    keep = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")
    return {k: m[k] for k in keep if k in m} | {
        "labels": {k: labels[k] for k in LABELS if k in labels},
        "annotations": {k: annotations[k] for k in ANNOTATIONS if k in annotations},
        "ownerReferences": [
            {"uid": r.get("uid"), "kind": r.get("kind"), "controller": bool(r.get("controller"))}
            for r in m.get("ownerReferences") or []
        ],
    }


def slim_job(job: dict) -> dict:
    status = job.get("status") or {}
    return {
        "metadata": _meta(job),
        "spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))},
        "status": {k: status[k] for k in ("conditions", "startTime", "completionTime") if k in status},
    }


def slim_pod(pod: dict) -> dict:
    status = pod.get("status") or {}
    trainer = [c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == "trainer"]
    limits = ((trainer[0].get("resources") or {}).get("limits") or {}) if trainer else {}
    return {
        "metadata": _meta(pod),
        "spec": {"memoryLimit": limits.get("memory")},
        "status": {k: status[k] for k in ("phase", "reason", "message", "podIP") if k in status}
        | {
            "containerStatuses": [
                {
                    "name": c.get("name"),
                    "state": {k: (c.get("state") or {}).get(k) for k in ("terminated", "waiting")},
                }
                for c in status.get("containerStatuses") or []
                if c.get("name") == "trainer"
            ],
            "conditions": [c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"],
        },
    }


def job_name_of(pod: dict) -> str | None:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return next((labels[k] for k in JOB_NAME_LABELS if labels.get(k)), None)


def owned_by(obj: dict, uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


def controlled_by(obj: dict, uid: str) -> bool:
    """Whether `uid` is obj's controller (the Job controller sets it on the pods it creates). A
    pod that only carries a stage Job's labels is anyone's: its phase and termination message
    must not count (anyone who may create pods in the namespace could forge a result)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def split_pods(jobs: list[dict], pods: list[dict]) -> tuple[dict[str, list[dict]], list[str]]:
    """Pods by the name of the stage Job that controls them, and the names of pods that carry a
    stage Job's name label without being its (ignored, and said in a Warning event)."""
    uid_of = {j["metadata"]["name"]: j["metadata"].get("uid") for j in jobs}
    mine: dict[str, list[dict]] = {}
    foreign = []
    for p in pods:
        name = job_name_of(p)
        if name not in uid_of:
            continue
        if controlled_by(p, uid_of[name]):
            mine.setdefault(name, []).append(p)
        else:
            foreign.append(p["metadata"]["name"])
    return mine, sorted(foreign)


def phase(pod: dict) -> str | None:
    return (pod.get("status") or {}).get("phase")


def terminated(pod: dict) -> dict | None:
    """The trainer container's terminated state, or None."""
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        if c.get("name") == "trainer" and (c.get("state") or {}).get("terminated"):
            return c["state"]["terminated"]
    return None


def memory_limit(pod: dict) -> str | None:
    spec = pod.get("spec") or {}
    if "memoryLimit" in spec:  # slimmed
        return spec["memoryLimit"]
    for c in spec.get("containers") or []:
        if c.get("name") == "trainer":
            return ((c.get("resources") or {}).get("limits") or {}).get("memory")
    return None


def termination_doc(message: str | None) -> dict | None:
    """The trainer's termination message: JSON (a stage result, or an error); None otherwise."""
    try:
        doc = json.loads(message or "")
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def pod_failure(pod: dict) -> tuple[str, bool]:
    """One line on why a stage pod failed, and whether it is the trainer's own message."""
    name = pod["metadata"]["name"]
    term = terminated(pod)
    if term is None:
        status = pod.get("status") or {}
        return f"pod {name}: {status.get('reason') or 'failed'}: {status.get('message') or 'no details'}", False
    code = term.get("exitCode")
    if term.get("reason") == "OOMKilled":
        return (
            f"pod {name}: container trainer was OOMKilled (exit {code}, memory limit "
            f"{memory_limit(pod) or 'none'}); raise spec.resources.memory or lower the batch size"
        ), False
    doc = termination_doc(term.get("message"))
    if doc and doc.get("error"):
        return doc["error"], True
    last = (term.get("message") or "").strip().splitlines()[-1:] if not doc else []
    detail = f": {last[0][:300]}" if last else ""
    return f"pod {name}: container trainer exited {code} ({term.get('reason') or 'Error'}){detail}", False


# Container waiting reasons that do not clear by waiting a little: a bad or unpullable image, a
# Secret, ConfigMap or ServiceAccount that is missing. (ContainerCreating and PodInitializing are
# progress; an image that is still being pulled is not stuck.)
STUCK_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)


def not_starting(pod: dict) -> str:
    """One line on why a pod that has not started cannot start ("" if nothing says so): the
    trainer container's stuck waiting reason, or the scheduler's Unschedulable."""
    if phase(pod) in POD_DONE:
        return ""
    name, status = pod["metadata"]["name"], pod.get("status") or {}
    for c in status.get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if c.get("name") == "trainer" and waiting.get("reason") in STUCK_REASONS:
            return f"pod {name}: {waiting['reason']}: {(waiting.get('message') or 'no details')[:300]}"
    for cond in status.get("conditions") or []:
        if (cond.get("type"), cond.get("status"), cond.get("reason")) == ("PodScheduled", "False", "Unschedulable"):
            return f"pod {name}: Unschedulable: {(cond.get('message') or 'no details')[:300]}"
    return ""


def refused_pods(job: str, events: list[tuple[str, str]]) -> str:
    """One line from the Job controller's FailedCreate events of a Job that has no pods (the API
    server refused them: a ResourceQuota, a LimitRange, an admission policy or webhook): the
    newest one's message, or "" if there is none. events: (time, message)."""
    if not events:
        return ""
    message = re.sub(r'pods "[^"]*" is forbidden', "pods are forbidden", max(events)[1] or "no details")
    # Without the refused pod's generated name, so each retry of the same refusal reads the same.
    return f"Job {job}: FailedCreate: {' '.join(message.split())[:300]}"


def is_rank0(pod: dict, want: str) -> bool:
    """The pod of completion index 0 (where rank 0 runs), in the given phase."""
    return ((pod.get("metadata") or {}).get("annotations") or {}).get(INDEX_ANNOTATION) == "0" and phase(pod) == want


def job_view(job: dict, pods: list[dict], workload: dict | None = None) -> JobView | None:
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    labels = meta.get("labels") or {}
    try:
        stage, attempt = int(labels[res.LABEL_STAGE]), int(labels[res.LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    conds = {c["type"]: c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = conds.get("Failed")
    wl_annotations = (workload or {}).get("metadata", {}).get("annotations") or {}
    failures = [pod_failure(p) for p in pods if phase(p) == "Failed"]
    # The trainer's own message where a pod left one; otherwise the first failure seen.
    failures.sort(key=lambda f: not f[1])
    result = None
    for p in pods:
        if is_rank0(p, "Succeeded"):
            doc = termination_doc((terminated(p) or {}).get("message"))
            if doc and "checkpoint" in doc:
                result = doc
    return JobView(
        name=meta["name"],
        stage=stage,
        attempt=attempt,
        suspended=bool((job.get("spec") or {}).get("suspend")),
        suspended_by_operator=(meta.get("annotations") or {}).get(res.ANNOTATION_SUSPENDED) == "true",
        complete="Complete" in conds,
        failed=failed is not None,
        failed_reason=(failed.get("reason") or "") if failed else "",
        failed_message=(failed.get("message") or "") if failed else "",
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        pods_left=sum(1 for p in pods if phase(p) not in POD_DONE),
        failure=failures[0][0] if failures else "",
        # The first by name: the same pod each reconcile, so one event per reason, not per listing order.
        not_starting=next(
            (why for p in sorted(pods, key=lambda p: p["metadata"]["name"]) if (why := not_starting(p))), ""
        ),
        result=result,
        queued=res.KUEUE_QUEUE in labels,
        workload=workload["metadata"]["name"] if workload else None,
        workload_active=bool((workload or {}).get("spec", {}).get("active", True)),
        workload_deactivated_by_operator=wl_annotations.get(res.ANNOTATION_DEACTIVATED) == "true",
    )


def needs_fresh_pods(views: list[JobView], status: dict) -> bool:
    """A cached pod may lag its Job: when the latest attempt of a stage not yet recorded as
    over has completed or failed, its pods' final states (rank 0's result, the failure, which
    ranks still run) decide what happens next, so they are listed live."""
    done = {s.get("index") for s in status.get("stages") or [] if s.get("phase") in ("Succeeded", "Failed")}
    latest: dict[int, JobView] = {}
    for j in views:
        if j.stage not in latest or j.attempt > latest[j.stage].attempt:
            latest[j.stage] = j
    return any((j.complete or j.failed) and k not in done for k, j in latest.items())
