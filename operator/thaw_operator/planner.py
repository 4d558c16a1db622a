"""The controller's brain, pure: (FineTuneJob, observed stage Jobs, verified checkpoints) ->
(objects to create, Jobs to patch, status, events). No API calls, no clock, no randomness,
so every transition is a table-driven unit test and a restarted operator recomputes the
same plan from what it observes.

Stage k starts only after stage k-1's Job completed *and* its final checkpoint verified in
the store. A failed stage Job is replaced by a fresh attempt (which resumes from the stage's
newest valid checkpoint) until the retry budget is spent. Terminal states are sticky.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thaw_operator import resources as res
from trainer.plan import expand_stages, stage_names
from trainer.spec import FineTuneJobSpec

PENDING, RUNNING, QUEUED, SUSPENDED, VERIFYING = "Pending", "Running", "Queued", "Suspended", "Verifying"
SUCCEEDED, FAILED = "Succeeded", "Failed"
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = ("Created", "Running", "Suspended", "Succeeded", "Failed")
VERIFY_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class JobView:
    """What the planner needs from one observed stage Job."""

    name: str
    stage: int
    attempt: int
    suspended: bool = False
    suspended_by_operator: bool = False
    active: int = 0
    complete: bool = False
    failed: bool = False
    failed_reason: str = ""
    failed_message: str = ""
    start_time: str | None = None
    completion_time: str | None = None


@dataclass(frozen=True)
class FinalView:
    """A stage's final checkpoint as verified in the store."""

    checkpoint: str
    metrics: dict


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)
    patch_jobs: list[tuple[str, dict]] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    requeue_after: float | None = None


def summarize(metrics: dict) -> dict:
    """The few numbers of a stage result that status shows (not the per-epoch history)."""
    keys = {
        "best_val_accuracy": "valAccuracy",
        "test_accuracy": "testAccuracy",
        "epochs_run": "epochs",
        "trainable_params": "trainableParams",
    }
    return {out: metrics[k] for k, out in keys.items() if k in metrics}


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
    finals: dict[int, FinalView | None],
    now: str,
    image: str,
    progress: dict[int, dict] | None = None,
) -> Plan:
    """`progress`: the newest epoch manifest's numbers of a running stage, shown in its status."""
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
                    phase in (RUNNING, VERIFYING),
                    reason if phase in (RUNNING, VERIFYING) else phase,
                    message if phase in (RUNNING, VERIFYING) else "",
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

    for k, st in enumerate(stages):
        if st["phase"] == SUCCEEDED:
            continue
        attempts = sorted(by_stage.get(k, []), key=lambda j: j.attempt)
        latest = attempts[-1] if attempts else None
        st["attempts"] = max(st["attempts"], latest.attempt if latest else 0)
        if latest is not None and latest.start_time and "startTime" not in st:
            st["startTime"] = latest.start_time

        if latest is None:
            if spec.suspend:
                st["phase"] = SUSPENDED
                return finish(SUSPENDED, "Suspended", f"suspended before stage {k} ({st['name']}) started", stages, k)
            attempt = st["attempts"] + 1
            out.create += [res.headless_service(ftj, k), res.stage_job(ftj, spec, k, stage_specs[k], attempt, image)]
            st["phase"], st["attempts"] = RUNNING, attempt
            st["startTime"] = st.get("startTime", now)
            out.events.append(
                (
                    "Normal",
                    "StageStarted",
                    f"stage {k} ({st['name']}) attempt {attempt}: Job {res.job_name(meta['name'], k, attempt)}",
                )
            )
            return finish(RUNNING, "StageRunning", f"stage {k} ({st['name']}) running", stages, k)

        if latest.complete:
            final = finals.get(k)
            if final is None:
                st["phase"] = VERIFYING
                out.requeue_after = VERIFY_RETRY_SECONDS
                msg = f"stage {k} ({st['name']}) Job completed; its final checkpoint does not verify in the store yet"
                if old_stages.get(k, {}).get("phase") != VERIFYING:
                    out.events.append(("Warning", "CheckpointNotVerified", msg))
                return finish(VERIFYING, "CheckpointNotVerified", msg, stages, k)
            st.update(
                phase=SUCCEEDED,
                checkpoint=final.checkpoint,
                result=summarize(final.metrics),
                completionTime=latest.completion_time or now,
            )
            acc = st["result"].get("valAccuracy")
            out.events.append(
                (
                    "Normal",
                    "StageSucceeded",
                    f"stage {k} ({st['name']}) succeeded"
                    + (f", val accuracy {acc:.4f}" if isinstance(acc, (int, float)) else ""),
                )
            )
            continue

        if latest.failed:
            if latest.failed_reason == "PodFailurePolicy":  # the trainer said: configuration error
                st["phase"] = FAILED
                msg = f"stage {k} ({st['name']}) failed with a configuration error: {latest.failed_message}"
                return finish(FAILED, "InvalidConfiguration", msg, stages, k)
            if st["attempts"] >= 1 + spec.run_policy.retries_per_stage:
                st["phase"] = FAILED
                msg = (
                    f"stage {k} ({st['name']}) failed {st['attempts']} times ({latest.failed_reason or 'Failed'}: "
                    f"{latest.failed_message}); retries exhausted"
                )
                return finish(FAILED, "RetriesExhausted", msg, stages, k)
            attempt = st["attempts"] + 1
            out.create.append(res.stage_job(ftj, spec, k, stage_specs[k], attempt, image, suspend=spec.suspend))
            st["phase"], st["attempts"] = RUNNING, attempt
            out.events.append(
                (
                    "Warning",
                    "StageRetrying",
                    f"stage {k} ({st['name']}) attempt {latest.attempt} failed "
                    f"({latest.failed_reason or 'Failed'}); starting attempt {attempt}, which resumes "
                    "from the newest valid checkpoint",
                )
            )
            return finish(RUNNING, "StageRetrying", f"stage {k} ({st['name']}) attempt {attempt}", stages, k)

        # The latest attempt exists and has not finished.
        if spec.suspend:
            if not latest.suspended:
                out.patch_jobs.append(
                    (
                        latest.name,
                        {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: "true"}}, "spec": {"suspend": True}},
                    )
                )
                out.events.append(
                    (
                        "Normal",
                        "Suspending",
                        f"stage {k} ({st['name']}): stopping pods; they checkpoint on SIGTERM and resume later",
                    )
                )
            st["phase"] = SUSPENDED
            return finish(SUSPENDED, "Suspended", f"stage {k} ({st['name']}) suspended", stages, k)
        if latest.suspended and latest.suspended_by_operator:
            out.patch_jobs.append(
                (
                    latest.name,
                    {"metadata": {"annotations": {res.ANNOTATION_SUSPENDED: None}}, "spec": {"suspend": False}},
                )
            )
            out.events.append(("Normal", "Resumed", f"stage {k} ({st['name']}) resumes from its newest checkpoint"))
            st["phase"] = RUNNING
            return finish(RUNNING, "StageRunning", f"stage {k} ({st['name']}) running", stages, k)
        if latest.suspended:  # held by a queue (Kueue), not by us: waiting, not failing
            st["phase"] = QUEUED
            if old.get("phase") != QUEUED:
                out.events.append(("Normal", "Queued", f"stage {k} ({st['name']}) is waiting for quota in its queue"))
            return finish(QUEUED, "Queued", f"stage {k} ({st['name']}) waiting for quota", stages, k)
        st["phase"] = RUNNING
        if progress and k in progress:
            st["progress"] = progress[k]
        return finish(RUNNING, "StageRunning", f"stage {k} ({st['name']}) running", stages, k)

    return finish(SUCCEEDED, "AllStagesSucceeded", f"all {len(stages)} stages succeeded", stages, len(stages) - 1)
