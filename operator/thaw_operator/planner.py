"""The controller's brain, pure: (FineTuneJob, observed stage Jobs and their pods) -> (objects
to create, Jobs to patch or delete, status, events). No API calls, no clock, no randomness,
so every transition is a table-driven unit test and a restarted operator recomputes the
same plan from what it observes.

Stage k starts only after stage k-1's Job completed *and* its rank 0 reported the final
checkpoint it verified (termination message); stage k's pods verify it again before they
load it, so the operator never reads the store. A failed attempt is replaced by a fresh one
(which resumes from the stage's newest valid checkpoint) once its pods have stopped, until
the retry budget is spent; only a configuration error fails at once. Terminal states are sticky.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from thaw_contract.plan import expand_stages, stage_names
from thaw_contract.spec import GATE_FAILED, FineTuneJobSpec
from thaw_operator import resources as res

PENDING, RUNNING, QUEUED, SUSPENDED = "Pending", "Running", "Queued", "Suspended"
SUCCEEDED, FAILED = "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)
WAIT_SECONDS = 2.0  # re-plan this soon while waiting for a failed attempt's pods to stop
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class JobView:
    """What the planner needs from one observed stage Job and its pods."""

    name: str
    stage: int
    attempt: int
    suspended: bool = False
    suspended_by_operator: bool = False
    complete: bool = False
    failed: bool = False
    failed_reason: str = ""
    failed_message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    pods_left: int = 0  # pods not yet Succeeded/Failed (a failed attempt's ranks still flushing)
    failure: str = ""  # why its pods failed, one line: the trainer's own message, OOMKilled and the limit
    result: dict | None = None  # rank 0's termination message: {"checkpoint": ..., "metrics": {...}}
    queued: bool = False  # carries Kueue's queue-name label: Kueue owns its suspend field
    workload: str | None = None  # its Kueue Workload, once Kueue created one
    workload_active: bool = True
    workload_deactivated_by_operator: bool = False


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    patch_jobs: list[tuple[str, dict]] = field(default_factory=list)
    patch_workloads: list[tuple[str, dict]] = field(default_factory=list)  # Kueue Workloads
    delete_jobs: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None


def _seconds(t: str) -> float:
    return datetime.strptime(t, TIME_FORMAT).replace(tzinfo=UTC).timestamp()


def _condition(old: list[dict], ctype: str, status: bool, reason: str, message: str, now: str, gen: int) -> dict:
    prev = next((c for c in old if c.get("type") == ctype), None)
    value = "True" if status else "False"
    changed = prev is None or prev.get("status") != value
    return {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed else prev.get("lastTransitionTime", now),
        "observedGeneration": gen,
    }


def plan(
    ftj: dict,
    spec: FineTuneJobSpec | None,
    spec_error: str | None,
    jobs: list[JobView],
    now: str,
    image: str,
    progress: dict[int, dict] | None = None,
) -> Plan:
    """`progress`: the numbers rank 0 of a running stage serves (epoch, val accuracy, ETA)."""
    meta, old = ftj["metadata"], ftj.get("status") or {}
    gen = meta.get("generation", 1)
    out = Plan()
    old_stages = {s["index"]: s for s in old.get("stages", []) if "index" in s}

    def finish(phase: str, reason: str, message: str, stages: list[dict], current: int) -> Plan:
        n = len(stages)
        done = sum(1 for s in stages if s["phase"] == SUCCEEDED)
        last_ok = [s for s in stages if s["phase"] == SUCCEEDED and "result" in s]
        conds = old.get("conditions", [])
        out.status = {
            "phase": phase,
            "currentStage": current,
            "stageProgress": f"{done}/{n}",
            "observedGeneration": gen,
            "message": message,
            "stages": stages,
            "conditions": [
                _condition(conds, "Created", True, "Created", "stage objects are managed by thaw", now, gen),
                _condition(
                    conds,
                    "Running",
                    phase == RUNNING,
                    reason if phase == RUNNING else phase,
                    message if phase == RUNNING else "",
                    now,
                    gen,
                ),
                _condition(
                    conds,
                    "Suspended",
                    phase == SUSPENDED,
                    reason if phase == SUSPENDED else "NotSuspended",
                    message if phase == SUSPENDED else "",
                    now,
                    gen,
                ),
                _condition(
                    conds,
                    "Succeeded",
                    phase == SUCCEEDED,
                    reason if phase == SUCCEEDED else phase,
                    message if phase == SUCCEEDED else "",
                    now,
                    gen,
                ),
                _condition(
                    conds,
                    "Failed",
                    phase == FAILED,
                    reason if phase == FAILED else "NotFailed",
                    message if phase == FAILED else "",
                    now,
                    gen,
                ),
            ],
        }
        if phase in TERMINAL:  # when it ended: the FineTuneJob's TTL counts from here
            out.status["completionTime"] = old.get("completionTime") if old.get("phase") == phase else now
        live = [s["progress"] for s in stages if s["phase"] == RUNNING and "progress" in s]
        if live and live[-1].get("valAccuracy") is not None:
            out.status["valAccuracy"] = live[-1]["valAccuracy"]
        elif last_ok:
            out.status["valAccuracy"] = last_ok[-1]["result"].get("valAccuracy")
        if old.get("phase") != phase:
            kind = "Warning" if phase == FAILED else "Normal"
            out.events.append((kind, {SUCCEEDED: "Succeeded", FAILED: "Failed"}.get(phase, phase), message))
        return out

    if spec is None:  # the API server's schema let it through, but the trainer's models did not
        return finish(FAILED, "InvalidSpec", spec_error or "invalid spec", [], 0)
    names = stage_names(spec)
    stage_specs = [s for _, s in expand_stages(spec)]
    image = spec.image or image  # the job's own image wins over the operator's default
    if old.get("phase") in TERMINAL and old.get("observedGeneration") == gen:
        out.status = old
        ttl = spec.run_policy.ttl_seconds_after_finished
        if ttl is not None and jobs and old.get("completionTime"):
            left = _seconds(old["completionTime"]) + ttl - _seconds(now)
            if left <= 0:
                out.delete_jobs = sorted(j.name for j in jobs)
            else:
                out.requeue_after = left
        return out

    by_stage: dict[int, list[JobView]] = {}
    for j in jobs:
        by_stage.setdefault(j.stage, []).append(j)
    stages: list[dict] = []
    for k, name in enumerate(names):
        prev = old_stages.get(k, {})
        stages.append(
            {
                "index": k,
                "name": name,
                "phase": prev.get("phase", PENDING),
                "epochs": stage_specs[k].epochs,
                "attempts": prev.get("attempts", 0),
                **{key: prev[key] for key in ("startTime", "completionTime", "checkpoint", "result") if key in prev},
            }
        )

    def retry(k: int, st: dict, cause: str) -> Plan:
        """The latest attempt of stage k is over without a result: another, if the budget allows."""
        label = f"stage {k} ({st['name']})"
        if st["attempts"] >= 1 + spec.run_policy.retries_per_stage:
            st["phase"] = FAILED
            msg = f"{label} failed {st['attempts']} times ({cause}); retries exhausted"
            return finish(FAILED, "RetriesExhausted", msg, stages, k)
        attempt = st["attempts"] + 1
        out.create.append(res.stage_job(ftj, spec, k, stage_specs[k], attempt, image, suspend=spec.suspend))
        st["phase"], st["attempts"] = RUNNING, attempt
        out.events.append(
            (
                "Warning",
                "StageRetrying",
                f"{label} attempt {attempt - 1} failed ({cause}); starting attempt {attempt}, which resumes "
                "from the newest valid checkpoint",
            )
        )
        return finish(RUNNING, "StageRetrying", f"{label} attempt {attempt}", stages, k)

    for k, st in enumerate(stages):
        if st["phase"] == SUCCEEDED:
            continue
        label = f"stage {k} ({st['name']})"
        attempts = sorted(by_stage.get(k, []), key=lambda j: j.attempt)
        latest = attempts[-1] if attempts else None
        st["attempts"] = max(st["attempts"], latest.attempt if latest else 0)
        if latest is not None and latest.start_time and "startTime" not in st:
            st["startTime"] = latest.start_time

        if latest is None and st["attempts"]:  # our Job is gone and we never saw it finish
            return retry(k, st, f"its Job {res.job_name(meta['name'], k, st['attempts'])} was deleted")
        if latest is None:
            if spec.suspend:
                st["phase"] = SUSPENDED
                return finish(SUSPENDED, "Suspended", f"suspended before {label} started", stages, k)
            attempt = 1
            out.create += [res.headless_service(ftj, k), res.stage_job(ftj, spec, k, stage_specs[k], attempt, image)]
            st["phase"], st["attempts"] = RUNNING, attempt
            st["startTime"] = st.get("startTime", now)
            out.events.append(
                ("Normal", "StageStarted", f"{label} attempt {attempt}: Job {res.job_name(meta['name'], k, attempt)}")
            )
            return finish(RUNNING, "StageRunning", f"{label} running", stages, k)

        if latest.complete:
            result = latest.result
            if not result or result.get("stage") != k or not result.get("checkpoint"):
                # Rank 0 reports the verified checkpoint in its termination message; without it
                # (pods removed), a new attempt finds the committed stage and reports it again.
                return retry(k, st, "completed, but its result was not found in rank 0's termination message")
            st.update(
                phase=SUCCEEDED,
                checkpoint=result["checkpoint"],
                result=dict(result.get("metrics") or {}),
                completionTime=latest.completion_time or now,
            )
            acc = st["result"].get("valAccuracy")
            out.events.append(
                (
                    "Normal",
                    "StageSucceeded",
                    f"{label} succeeded" + (f", val accuracy {acc:.4f}" if isinstance(acc, (int, float)) else ""),
                )
            )
            gate = st["result"].get("gate") or {}
            if gate.get("decision") == "rolled_back":
                why = f"{label} rolled back: {gate.get('reason')}; the next stage starts from the weights before it"
                out.events.append(("Warning", "StageRolledBack", why))
            elif gate.get("decision") == "kept":
                why = f"{label} left the model worse: {gate.get('reason')}; kept (spec.gate.onRegression: keep)"
                out.events.append(("Warning", "StageRegressed", why))
            continue

        if latest.failed:
            cause = latest.failure or f"{latest.failed_reason or 'Failed'}: {latest.failed_message}"
            if latest.failed_reason == "PodFailurePolicy":  # the trainer said: not worth retrying
                st["phase"] = FAILED
                if GATE_FAILED in cause:
                    return finish(FAILED, "StageRegressed", f"{label} failed its gate: {cause}", stages, k)
                return finish(FAILED, "InvalidConfiguration", f"{label} configuration error: {cause}", stages, k)
            if latest.pods_left:
                # Its ranks may still be committing checkpoints: the next attempt must not choose
                # its resume point before they stop (kubelet grace period bounds the wait).
                st["phase"] = RUNNING
                out.requeue_after = WAIT_SECONDS
                msg = (
                    f"{label} attempt {latest.attempt} failed ({cause}); waiting for {latest.pods_left} pod(s) to stop"
                )
                return finish(RUNNING, "AttemptFailed", msg, stages, k)
            return retry(k, st, cause)

        # The latest attempt exists and has not finished.
        if latest.queued:  # Kueue's: stop and resume through its Workload, never its suspend field
            flag = lambda active: {
                "metadata": {"annotations": {res.ANNOTATION_DEACTIVATED: None if active else "true"}},
                "spec": {"active": active},
            }
            if spec.suspend:
                if latest.workload is None:
                    out.requeue_after = WAIT_SECONDS  # Kueue has not created it yet
                elif latest.workload_active:
                    out.patch_workloads.append((latest.workload, flag(False)))
                    out.events.append(
                        ("Normal", "Suspending", f"{label}: deactivating its Kueue Workload; Kueue stops the pods")
                    )
                st["phase"] = SUSPENDED
                return finish(SUSPENDED, "Suspended", f"{label} suspended", stages, k)
            if latest.workload and not latest.workload_active and latest.workload_deactivated_by_operator:
                out.patch_workloads.append((latest.workload, flag(True)))
                out.events.append(("Normal", "Resumed", f"{label}: its Kueue Workload is active again"))
                st["phase"] = QUEUED
                return finish(QUEUED, "Queued", f"{label} waiting for quota", stages, k)
        if spec.suspend:
            if not latest.suspended:
                out.patch_jobs.append(
                    (
                        latest.name,
                        {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: "true"}}, "spec": {"suspend": True}},
                    )
                )
                out.events.append(
                    ("Normal", "Suspending", f"{label}: stopping pods; they checkpoint on SIGTERM and resume later")
                )
            st["phase"] = SUSPENDED
            return finish(SUSPENDED, "Suspended", f"{label} suspended", stages, k)
        if latest.suspended and latest.suspended_by_operator:
            out.patch_jobs.append(
                (
                    latest.name,
                    {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: None}}, "spec": {"suspend": False}},
                )
            )
            out.events.append(("Normal", "Resumed", f"{label} resumes from its newest checkpoint"))
            st["phase"] = RUNNING
            return finish(RUNNING, "StageRunning", f"{label} running", stages, k)
        if latest.suspended:  # held by a queue (Kueue), not by us: waiting, not failing
            st["phase"] = QUEUED
            if old.get("phase") != QUEUED:
                out.events.append(("Normal", "Queued", f"{label} is waiting for quota in its queue"))
            return finish(QUEUED, "Queued", f"{label} waiting for quota", stages, k)
        st["phase"] = RUNNING
        if progress and k in progress:
            st["progress"] = progress[k]
        return finish(RUNNING, "StageRunning", f"{label} running", stages, k)

    return finish(SUCCEEDED, "AllStagesSucceeded", f"all {len(stages)} stages succeeded", stages, len(stages) - 1)
