"""The controller's brain, pure: (FineTuneJob, observed stage Jobs and their pods) -> (objects
to create, Jobs to patch or delete, status, events). No API calls, no clock, no randomness,
so every transition is a table-driven unit test and a restarted operator recomputes the
same plan from what it observes.

Stage k starts only after stage k-1's Job completed *and* its rank 0 reported the final
checkpoint it verified (termination message); stage k's pods verify it again before they
load it, so the operator never reads the store. A failed attempt is replaced by a fresh one
(which resumes from the stage's newest valid checkpoint) once its pods have stopped, until
the retry budget is spent; only a configuration error fails at once. Terminal states are sticky.

`plan` walks the stages in order and hands the first unfinished one to one function per
policy: start, verify (a completed attempt), failure (retry or fail), queue (Kueue), suspend.
The status itself is written by thaw_operator.status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thaw_contract.plan import expand_stages, stage_names
from thaw_contract.spec import GATE_FAILED, FineTuneJobSpec, StageSpec
from thaw_contract.stage_result import VAL_ACCURACY, reports_stage, stopped_the_job
from thaw_operator import resources as res
from thaw_operator import status
from thaw_operator.status import FAILED, PENDING, QUEUED, RUNNING, SKIPPED, SUCCEEDED, SUSPENDED, TERMINAL

WAIT_SECONDS = 2.0  # re-plan this soon while waiting for a failed attempt's pods to stop
NO_PODS_SECONDS = 10.0  # and this soon while a running attempt has no pod (why may be in its events)


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
    not_starting: str = ""  # why a pod of it cannot start, one line (observe.not_starting)
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


@dataclass
class _Ctx:
    """One planning pass: the inputs, the per-stage rows being written, and the plan."""

    ftj: dict
    spec: FineTuneJobSpec
    stage_specs: list[StageSpec]
    image: str
    now: str
    old: dict
    stages: list[dict]
    foreign: list[str] = field(default_factory=list)  # pods with a stage Job's labels, not its own
    out: Plan = field(default_factory=Plan)

    def finish(self, phase: str, reason: str, message: str, current: int) -> Plan:
        gen = self.ftj["metadata"].get("generation", 1)
        self.out.status = status.build(self.old, phase, reason, message, self.stages, current, self.now, gen)
        if self.old.get("phase") != phase:
            self.out.events.append(("Warning" if phase == FAILED else "Normal", phase, message))
        self._ignore_foreign()
        return self.out

    def _ignore_foreign(self) -> None:
        """Each pod that wears a stage Job's labels without being its is named once, in a Warning
        event and in status.ignoredPods (the last IGNORED_KEPT), and never read."""
        seen = list(self.old.get("ignoredPods") or [])
        new = [p for p in self.foreign if p not in seen]
        for pod in new:
            msg = f"pod {pod} carries a stage Job's labels but that Job does not control it; its result is ignored"
            self.out.events.append(("Warning", "ForeignPodIgnored", msg))
        if seen or new:
            self.out.status["ignoredPods"] = (seen + new)[-IGNORED_KEPT:]


IGNORED_KEPT = 20


def _label(k: int, st: dict) -> str:
    return f"stage {k} ({st['name']})"


def plan(
    ftj: dict,
    spec: FineTuneJobSpec | None,
    spec_error: str | None,
    jobs: list[JobView],
    now: str,
    image: str,
    progress: dict[int, dict] | None = None,
    foreign: list[str] | tuple[str, ...] = (),
) -> Plan:
    """`progress`: the numbers rank 0 of a running stage serves (epoch, val accuracy, ETA).
    `foreign`: pods that carry a stage Job's labels but are not controlled by it (never read)."""
    old = ftj.get("status") or {}
    if spec is None:  # the API server's schema let it through, but the trainer's models did not
        ctx = _Ctx(ftj, None, [], image, now, old, [])  # type: ignore[arg-type]
        return ctx.finish(FAILED, "InvalidSpec", spec_error or "invalid spec", 0)
    if old.get("phase") in TERMINAL and old.get("observedGeneration") == ftj["metadata"].get("generation", 1):
        return _finished(old, spec, jobs, now)
    stage_specs = [s for _, s in expand_stages(spec)]
    rows = _stage_rows(old, spec, stage_specs)
    ctx = _Ctx(ftj, spec, stage_specs, spec.image or image, now, old, rows, list(foreign))
    by_stage: dict[int, list[JobView]] = {}
    for j in jobs:
        by_stage.setdefault(j.stage, []).append(j)
    for k, st in enumerate(ctx.stages):
        if st["phase"] != SUCCEEDED and (over := _past_deadline(ctx, k, st, by_stage.get(k, []))) is not None:
            return over
        if st["phase"] != SUCCEEDED and (waiting := _stage(ctx, k, st, by_stage.get(k, []), progress)) is not None:
            return _wake_at_deadline(ctx, waiting)
        if stopped_the_job(st.get("result")) and k < len(ctx.stages) - 1:
            return _stop(ctx, k, st)
    n = len(ctx.stages)
    return ctx.finish(SUCCEEDED, "AllStagesSucceeded", f"all {n} stages succeeded", n - 1)


def _stage(ctx: _Ctx, k: int, st: dict, jobs: list[JobView], progress: dict[int, dict] | None) -> Plan | None:
    """Stage k, not yet Succeeded, by its latest attempt: the plan while it is not done; None
    once its completed attempt's result is verified (on to the next stage)."""
    latest = max(jobs, key=lambda j: j.attempt) if jobs else None
    st["attempts"] = max(st["attempts"], latest.attempt if latest else 0)
    if latest is not None and latest.start_time and "startTime" not in st:
        st["startTime"] = latest.start_time
    if latest is None:
        return _start(ctx, k, st)
    if latest.complete:
        return _verify(ctx, k, st, latest)
    if latest.failed:
        return _failure(ctx, k, st, latest)
    # The latest attempt exists and has not finished.
    for policy in (_queue, _suspend):
        if (done := policy(ctx, k, st, latest)) is not None:
            return done
    st["phase"] = RUNNING
    if latest.not_starting:
        return _not_starting(ctx, k, st, latest)
    if latest.pods_left == 0:  # no pod yet: a refusal (FailedCreate) changes no Job and wakes nothing
        ctx.out.requeue_after = NO_PODS_SECONDS
    if progress and k in progress:
        st["progress"] = progress[k]
    return ctx.finish(RUNNING, "StageRunning", f"{_label(k, st)} running", k)


def _deadline_left(ctx: _Ctx) -> float | None:
    """Seconds left of spec.runPolicy.deadlineSeconds, counted from the first stage's start;
    None without a deadline or before anything started."""
    deadline = ctx.spec.run_policy.deadline_seconds
    started = ctx.stages[0].get("startTime") if ctx.stages else None
    if deadline is None or not started:
        return None
    return status.seconds(started) + deadline - status.seconds(ctx.now)


def _past_deadline(ctx: _Ctx, k: int, st: dict, jobs: list[JobView]) -> Plan | None:
    """The job ran past its deadline while stage k was next or running: its running Job goes (the
    pods checkpoint on SIGTERM) and the job fails; a finished stage's result is not touched."""
    left = _deadline_left(ctx)
    if left is None or left > 0:
        return None
    deadline = ctx.spec.run_policy.deadline_seconds
    ctx.out.delete_jobs += [j.name for j in jobs if not j.complete and not j.failed]
    st["phase"] = FAILED
    msg = f"the job ran past its deadline of {deadline} s (spec.runPolicy.deadlineSeconds) in {_label(k, st)}"
    return ctx.finish(FAILED, "DeadlineExceeded", msg, k)


def _wake_at_deadline(ctx: _Ctx, p: Plan) -> Plan:
    """A plan that leaves the job running is looked at again when its deadline passes."""
    left = _deadline_left(ctx)
    if left is not None and p.status.get("phase") not in TERMINAL:
        p.requeue_after = left if p.requeue_after is None else min(p.requeue_after, left)
    return p


def _not_starting(ctx: _Ctx, k: int, st: dict, latest: JobView) -> Plan:
    """A pod of stage k cannot start (observe.not_starting): said at once in status and in one
    Warning event per distinct reason; after runPolicy.startupTimeoutSeconds without a start the
    job fails with it (the Job goes, so its pods stop holding quota and pulling). The clock
    starts when a reason is first seen and stops when none is left (stage row `notStarting`)."""
    label, why = _label(k, st), latest.not_starting
    prev = next((s.get("notStarting") for s in ctx.old.get("stages") or [] if s.get("index") == k), None) or {}
    since = prev.get("since") or ctx.now
    st["notStarting"] = {"since": since, "reason": why}
    if prev.get("reason") != why:
        ctx.out.events.append(("Warning", "StageNotStarting", f"{label} cannot start: {why}"))
    timeout = ctx.spec.run_policy.startup_timeout_seconds
    if timeout is None:
        return ctx.finish(RUNNING, "StageNotStarting", f"{label} cannot start: {why}", k)
    left = status.seconds(since) + timeout - status.seconds(ctx.now)
    if left <= 0:
        st["phase"] = FAILED
        ctx.out.delete_jobs.append(latest.name)
        msg = f"{label} could not start in {timeout} s (spec.runPolicy.startupTimeoutSeconds): {why}"
        return ctx.finish(FAILED, "StageNotStarting", msg, k)
    ctx.out.requeue_after = left  # the timeout fires even if nothing else changes
    msg = f"{label} cannot start: {why}; failing in {left:.0f} s (spec.runPolicy.startupTimeoutSeconds)"
    return ctx.finish(RUNNING, "StageNotStarting", msg, k)


def _stop(ctx: _Ctx, k: int, st: dict) -> Plan:
    """Stage k's gate ended the job (onRegression: stop): the job succeeds with the weights stage
    k passed on (its input's), and the stages after it never start."""
    later = ctx.stages[k + 1 :]
    for row in later:
        row["phase"] = SKIPPED
    gate = st["result"]["gate"]
    skipped = ", ".join(f"{r['index']} ({r['name']})" for r in later)
    msg = (
        f"{_label(k, st)} did not improve on the stage before ({gate.get('reason')}); the job ends with the "
        f"weights before it (spec.gate.onRegression: stop); skipped: stage {skipped}"
    )
    return ctx.finish(SUCCEEDED, "StoppedByGate", msg, k)


def _finished(old: dict, spec: FineTuneJobSpec, jobs: list[JobView], now: str) -> Plan:
    """Terminal states are sticky; the stage Jobs go once the TTL after finishing has passed."""
    out = Plan(status=old)
    ttl = spec.run_policy.ttl_seconds_after_finished
    if ttl is not None and jobs and old.get("completionTime"):
        left = status.seconds(old["completionTime"]) + ttl - status.seconds(now)
        if left <= 0:
            out.delete_jobs = sorted(j.name for j in jobs)
        else:
            out.requeue_after = left
    return out


def _stage_rows(old: dict, spec: FineTuneJobSpec, stage_specs: list[StageSpec]) -> list[dict]:
    """The per-stage status rows, carrying over what the previous status recorded."""
    old_stages = {s["index"]: s for s in old.get("stages", []) if "index" in s}
    rows = []
    for k, name in enumerate(stage_names(spec)):
        prev = old_stages.get(k, {})
        rows.append(
            {
                "index": k,
                "name": name,
                "phase": prev.get("phase", PENDING),
                "epochs": stage_specs[k].epochs,
                "attempts": prev.get("attempts", 0),
                **{
                    key: prev[key]
                    for key in ("startTime", "completionTime", "checkpoint", "manifestSha256", "result")
                    if key in prev
                },
            }
        )
    return rows


def _start(ctx: _Ctx, k: int, st: dict) -> Plan:
    """No Job for stage k: its first attempt (or none while suspended), or a retry when ours is gone."""
    label, name = _label(k, st), ctx.ftj["metadata"]["name"]
    if st["attempts"]:  # our Job is gone and we never saw it finish
        return _retry(ctx, k, st, f"its Job {res.job_name(name, k, st['attempts'])} was deleted")
    if ctx.spec.suspend:
        st["phase"] = SUSPENDED
        return ctx.finish(SUSPENDED, "Suspended", f"suspended before {label} started", k)
    ctx.out.create += [
        *res.cache_claims(ctx.ftj, ctx.spec),
        res.headless_service(ctx.ftj, k),
        res.stage_job(ctx.ftj, ctx.spec, k, ctx.stage_specs[k], 1, ctx.image, input_digest=_input_digest(ctx, k)),
    ]
    st["phase"], st["attempts"] = RUNNING, 1
    st["startTime"] = st.get("startTime", ctx.now)
    ctx.out.requeue_after = NO_PODS_SECONDS  # pods the API server refuses would wake nothing
    ctx.out.events.append(("Normal", "StageStarted", f"{label} attempt 1: Job {res.job_name(name, k, 1)}"))
    return ctx.finish(RUNNING, "StageRunning", f"{label} running", k)


def _input_digest(ctx: _Ctx, k: int) -> str | None:
    """The manifest digest stage k-1's rank 0 reported for its final checkpoint (status)."""
    return ctx.stages[k - 1].get("manifestSha256") if k > 0 else None


def _retry(ctx: _Ctx, k: int, st: dict, cause: str) -> Plan:
    """The latest attempt of stage k is over without a result: another, if the budget allows."""
    label = _label(k, st)
    if st["attempts"] >= 1 + ctx.spec.run_policy.retries_per_stage:
        st["phase"] = FAILED
        msg = f"{label} failed {st['attempts']} times ({cause}); retries exhausted"
        return ctx.finish(FAILED, "RetriesExhausted", msg, k)
    attempt = st["attempts"] + 1
    job = res.stage_job(
        ctx.ftj, ctx.spec, k, ctx.stage_specs[k], attempt, ctx.image, ctx.spec.suspend, _input_digest(ctx, k)
    )
    ctx.out.create += [*res.cache_claims(ctx.ftj, ctx.spec), job]  # the claim again, should it have been deleted
    st["phase"], st["attempts"] = RUNNING, attempt
    ctx.out.requeue_after = NO_PODS_SECONDS
    ctx.out.events.append(
        (
            "Warning",
            "StageRetrying",
            f"{label} attempt {attempt - 1} failed ({cause}); starting attempt {attempt}, which resumes "
            "from the newest valid checkpoint",
        )
    )
    return ctx.finish(RUNNING, "StageRetrying", f"{label} attempt {attempt}", k)


def _verify(ctx: _Ctx, k: int, st: dict, latest: JobView) -> Plan | None:
    """A completed attempt counts only with rank 0's verified checkpoint; None: stage k succeeded."""
    label, result = _label(k, st), latest.result
    if not reports_stage(result, k):
        # Rank 0 reports the verified checkpoint in its termination message; without it
        # (pods removed), a new attempt finds the committed stage and reports it again.
        return _retry(ctx, k, st, "completed, but its result was not found in rank 0's termination message")
    st.update(
        phase=SUCCEEDED,
        checkpoint=result["checkpoint"],
        manifestSha256=result.get("manifestSha256") or "",
        result=dict(result.get("metrics") or {}),
        completionTime=latest.completion_time or ctx.now,
    )
    acc = st["result"].get(VAL_ACCURACY)
    succeeded = f"{label} succeeded" + (f", val accuracy {acc:.4f}" if isinstance(acc, (int, float)) else "")
    ctx.out.events.append(("Normal", "StageSucceeded", succeeded))
    gate = st["result"].get("gate") or {}
    if gate.get("decision") in ("rolled_back", "stopped"):
        then = (
            "the job ends with the weights before it (spec.gate.onRegression: stop)"
            if gate["decision"] == "stopped"
            else "the next stage starts from the weights before it"
        )
        ctx.out.events.append(("Warning", "StageRolledBack", f"{label} rolled back: {gate.get('reason')}; {then}"))
    elif gate.get("decision") == "kept":
        why = f"{label} left the model worse: {gate.get('reason')}; kept (spec.gate.onRegression: keep)"
        ctx.out.events.append(("Warning", "StageRegressed", why))
    elif st["result"].get("collapsed"):  # a first stage, with nothing to roll back to
        ctx.out.events.append(("Warning", "StageCollapsed", f"{label} predicts {st['result']['collapsed']}"))
    return None


def _failure(ctx: _Ctx, k: int, st: dict, latest: JobView) -> Plan:
    """A failed attempt: a configuration error or a failed gate ends the job; anything else is
    retried once its pods have stopped."""
    label = _label(k, st)
    cause = latest.failure or f"{latest.failed_reason or 'Failed'}: {latest.failed_message}"
    if latest.failed_reason == "PodFailurePolicy":  # the trainer said: not worth retrying
        st["phase"] = FAILED
        if GATE_FAILED in cause:
            return ctx.finish(FAILED, "StageRegressed", f"{label} failed its gate: {cause}", k)
        return ctx.finish(FAILED, "InvalidConfiguration", f"{label} configuration error: {cause}", k)
    if latest.pods_left:
        # Its ranks may still be committing checkpoints: the next attempt must not choose
        # its resume point before they stop (kubelet grace period bounds the wait).
        st["phase"] = RUNNING
        ctx.out.requeue_after = WAIT_SECONDS
        msg = f"{label} attempt {latest.attempt} failed ({cause}); waiting for {latest.pods_left} pod(s) to stop"
        return ctx.finish(RUNNING, "AttemptFailed", msg, k)
    return _retry(ctx, k, st, cause)


def _workload_active(active: bool) -> dict:
    return {
        "metadata": {"annotations": {res.ANNOTATION_DEACTIVATED: None if active else "true"}},
        "spec": {"active": active},
    }


def _queue(ctx: _Ctx, k: int, st: dict, latest: JobView) -> Plan | None:
    """A Job under Kueue is stopped and resumed through its Workload, never its suspend field."""
    if not latest.queued:
        return None
    label = _label(k, st)
    if ctx.spec.suspend:
        if latest.workload is None:
            ctx.out.requeue_after = WAIT_SECONDS  # Kueue has not created it yet
        elif latest.workload_active:
            ctx.out.patch_workloads.append((latest.workload, _workload_active(False)))
            ctx.out.events.append(
                ("Normal", "Suspending", f"{label}: deactivating its Kueue Workload; Kueue stops the pods")
            )
        st["phase"] = SUSPENDED
        return ctx.finish(SUSPENDED, "Suspended", f"{label} suspended", k)
    if latest.workload and not latest.workload_active and latest.workload_deactivated_by_operator:
        ctx.out.patch_workloads.append((latest.workload, _workload_active(True)))
        ctx.out.events.append(("Normal", "Resumed", f"{label}: its Kueue Workload is active again"))
        st["phase"] = QUEUED
        return ctx.finish(QUEUED, "Queued", f"{label} waiting for quota", k)
    return None


def _suspend(ctx: _Ctx, k: int, st: dict, latest: JobView) -> Plan | None:
    """spec.suspend stops the pods (they checkpoint on SIGTERM); clearing it resumes; a Job held
    suspended by a queue that is not ours is waiting, not failing."""
    label = _label(k, st)
    if ctx.spec.suspend:
        if not latest.suspended:
            stop = {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: "true"}}, "spec": {"suspend": True}}
            ctx.out.patch_jobs.append((latest.name, stop))
            ctx.out.events.append(
                ("Normal", "Suspending", f"{label}: stopping pods; they checkpoint on SIGTERM and resume later")
            )
        st["phase"] = SUSPENDED
        return ctx.finish(SUSPENDED, "Suspended", f"{label} suspended", k)
    if latest.suspended and latest.suspended_by_operator:
        go = {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: None}}, "spec": {"suspend": False}}
        ctx.out.patch_jobs.append((latest.name, go))
        ctx.out.events.append(("Normal", "Resumed", f"{label} resumes from its newest checkpoint"))
        st["phase"] = RUNNING
        return ctx.finish(RUNNING, "StageRunning", f"{label} running", k)
    if latest.suspended:  # held by a queue (Kueue), not by us
        st["phase"] = QUEUED
        if ctx.old.get("phase") != QUEUED:
            ctx.out.events.append(("Normal", "Queued", f"{label} is waiting for quota in its queue"))
        return ctx.finish(QUEUED, "Queued", f"{label} waiting for quota", k)
    return None
