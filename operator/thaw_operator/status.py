"""A FineTuneJob's status, pure: its phases, its conditions (one table) and the summary fields
that `kubectl get ftj` shows. The planner decides the phase; this module writes it down the
same way every time, so a condition's lastTransitionTime moves only when its value does.
"""

from __future__ import annotations

from datetime import UTC, datetime

from thaw_contract.stage_result import VAL_ACCURACY

PENDING, RUNNING, QUEUED, SUSPENDED = "Pending", "Running", "Queued", "Suspended"
SUCCEEDED, FAILED = "Succeeded", "Failed"
PHASES = (PENDING, RUNNING, QUEUED, SUSPENDED, SUCCEEDED, FAILED)
TERMINAL = (SUCCEEDED, FAILED)
SKIPPED = "Skipped"  # a stage's phase only: a gate ended the job before it (onRegression: stop)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

# The conditions after "Created" (always True): (type, the phase in which it is True, its reason
# otherwise; None: the phase itself). In its phase a condition carries the plan's reason and message.
CONDITIONS = (
    ("Running", RUNNING, None),
    ("Suspended", SUSPENDED, "NotSuspended"),
    ("Succeeded", SUCCEEDED, None),
    ("Failed", FAILED, "NotFailed"),
)


def seconds(t: str) -> float:
    return datetime.strptime(t, TIME_FORMAT).replace(tzinfo=UTC).timestamp()


def condition(old: list[dict], ctype: str, status: bool, reason: str, message: str, now: str, gen: int) -> dict:
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


def build(
    old: dict, phase: str, reason: str, message: str, stages: list[dict], current: int, now: str, gen: int
) -> dict:
    """The whole status for `phase`, from the previous status `old` and the per-stage rows."""
    conds = old.get("conditions", [])
    done = sum(1 for s in stages if s["phase"] == SUCCEEDED)
    status = {
        "phase": phase,
        "currentStage": current,
        "stageProgress": f"{done}/{len(stages)}",
        "observedGeneration": gen,
        "message": message,
        "stages": stages,
        "conditions": [condition(conds, "Created", True, "Created", "stage objects are managed by thaw", now, gen)]
        + [
            condition(
                conds,
                ctype,
                phase == when,
                reason if phase == when else (otherwise or phase),
                message if phase == when else "",
                now,
                gen,
            )
            for ctype, when, otherwise in CONDITIONS
        ],
    }
    if phase in TERMINAL:  # when it ended: the FineTuneJob's TTL counts from here
        status["completionTime"] = old.get("completionTime") if old.get("phase") == phase else now
    # valAccuracy: the running stage's live figure, else the last finished stage's.
    live = [s["progress"] for s in stages if s["phase"] == RUNNING and "progress" in s]
    last_ok = [s for s in stages if s["phase"] == SUCCEEDED and "result" in s]
    if live and live[-1].get("valAccuracy") is not None:
        status["valAccuracy"] = live[-1]["valAccuracy"]
    elif last_ok:
        status["valAccuracy"] = last_ok[-1]["result"].get(VAL_ACCURACY)
    # model: the artifact the job's last stage (or the stage whose gate stopped it) published.
    published = [s["result"]["model"] for s in last_ok if (s["result"] or {}).get("model")]
    if published:
        status["model"] = published[-1]
    return status
