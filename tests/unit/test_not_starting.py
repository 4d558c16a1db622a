"""A stage whose pods cannot start says why at once and fails after runPolicy.startupTimeoutSeconds
(issue: a missing credentialsSecret left a FineTuneJob `Running` with no reason)."""

from __future__ import annotations

from thaw_operator import observe
from thaw_operator.planner import JobView

from tests.unit.test_operator_planner import cond, ftj, job, reasons, run

LATER = "2026-11-28T00:10:00Z"  # NOW + 600 s
MUCH_LATER = "2026-11-28T00:15:00Z"  # NOW + 900 s: the default timeout
SECRET = 'pod ft-0-a1-0-x: CreateContainerConfigError: secret "s3-creds" not found'


def _pod(name="ft-0-a1-0-x", waiting=None, scheduled=None, phase="Pending") -> dict:
    status = {"phase": phase, "containerStatuses": [], "conditions": []}
    if waiting:
        status["containerStatuses"].append({"name": "trainer", "state": {"waiting": waiting}})
    if scheduled:
        status["conditions"].append({"type": "PodScheduled", "status": "False", **scheduled})
    return {"metadata": {"name": name}, "status": status}


def test_a_pod_that_cannot_start_is_named_with_its_reason_and_one_that_is_progressing_is_not():
    missing = _pod(waiting={"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'})
    assert observe.not_starting(missing) == SECRET
    assert observe.not_starting(observe.slim_pod(missing)) == SECRET  # the informer's slim copy keeps it
    pull = _pod(waiting={"reason": "ImagePullBackOff", "message": 'Back-off pulling image "thaw:nope"'})
    assert observe.not_starting(pull) == 'pod ft-0-a1-0-x: ImagePullBackOff: Back-off pulling image "thaw:nope"'
    unschedulable = _pod(
        scheduled={"reason": "Unschedulable", "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}
    )
    assert observe.not_starting(observe.slim_pod(unschedulable)) == (
        "pod ft-0-a1-0-x: Unschedulable: 0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    )
    for fine in (
        _pod(waiting={"reason": "ContainerCreating"}),  # pulling or mounting: progress
        _pod(scheduled={"reason": "SchedulingGated", "message": "gated"}),  # Kueue or a gate holds it
        _pod(phase="Running"),
        _pod(waiting={"reason": "CreateContainerConfigError"}, phase="Failed"),  # over: a failure, not a wait
    ):
        assert observe.not_starting(fine) == ""


def test_the_reason_shows_at_once_and_the_job_fails_after_the_startup_timeout():
    first = run(ftj())
    stuck = job(0, 1, not_starting=SECRET)
    p = run(ftj(first.status), [stuck])
    assert p.status["phase"] == "Running" and cond(p, "Running")["reason"] == "StageNotStarting"
    assert p.status["message"] == (
        f"stage 0 (head) cannot start: {SECRET}; failing in 900 s (spec.runPolicy.startupTimeoutSeconds)"
    )
    assert p.events == [("Warning", "StageNotStarting", f"stage 0 (head) cannot start: {SECRET}")]
    assert p.requeue_after == 900 and p.status["stages"][0]["notStarting"] == {
        "since": "2026-11-28T00:00:00Z",
        "reason": SECRET,
    }
    later = run(ftj(p.status), [stuck], now=LATER)
    assert later.status["phase"] == "Running" and later.requeue_after == 300
    assert later.events == []  # the same reason is said once
    assert later.status["stages"][0]["notStarting"]["since"] == "2026-11-28T00:00:00Z"  # the clock kept
    over = run(ftj(later.status), [stuck], now=MUCH_LATER)
    assert over.status["phase"] == "Failed" and cond(over, "Failed")["reason"] == "StageNotStarting"
    assert over.status["message"] == (
        f"stage 0 (head) could not start in 900 s (spec.runPolicy.startupTimeoutSeconds): {SECRET}"
    )
    assert over.delete_jobs == ["ft-0-a1"]  # its pods stop pulling and holding quota
    assert "Failed" in reasons(over) and over.status["stages"][0]["phase"] == "Failed"


def test_a_fixed_cause_clears_the_reason_and_the_clock_and_null_waits_forever():
    first = run(ftj())
    p = run(ftj(first.status), [job(0, 1, not_starting=SECRET)])
    fixed = run(ftj(p.status), [job(0, 1)], now=LATER)  # the Secret was created: the pods start
    assert fixed.status["message"] == "stage 0 (head) running" and "notStarting" not in fixed.status["stages"][0]
    again = run(ftj(fixed.status), [job(0, 1, not_starting=SECRET)], now=MUCH_LATER)
    assert again.status["phase"] == "Running"  # a new clock, not the old one
    assert again.status["stages"][0]["notStarting"]["since"] == MUCH_LATER
    other = "pod ft-0-a1-1-y: ImagePullBackOff: Back-off pulling image"
    changed = run(ftj(again.status), [job(0, 1, not_starting=other)], now=MUCH_LATER)
    assert changed.events == [("Warning", "StageNotStarting", f"stage 0 (head) cannot start: {other}")]

    patient = ftj(first.status, runPolicy={"startupTimeoutSeconds": None})
    p = run(patient, [job(0, 1, not_starting=SECRET)])
    p = run(
        ftj(p.status, runPolicy={"startupTimeoutSeconds": None}),
        [job(0, 1, not_starting=SECRET)],
        now="2026-11-29T00:00:00Z",
    )
    assert p.status["phase"] == "Running" and p.status["message"] == f"stage 0 (head) cannot start: {SECRET}"
    assert p.requeue_after is None and p.delete_jobs == []


def test_the_job_view_takes_the_first_pod_that_cannot_start():
    job_obj = {
        "metadata": {"name": "ft-0-a1", "labels": {"thaw.dev/stage": "0", "thaw.dev/attempt": "1"}},
        "status": {},
    }
    pods = [
        _pod("ft-0-a1-0-x", phase="Running"),
        _pod("ft-0-a1-1-y", waiting={"reason": "ErrImagePull", "message": "not found"}),
    ]
    view = observe.job_view(job_obj, pods)
    assert isinstance(view, JobView) and view.not_starting == "pod ft-0-a1-1-y: ErrImagePull: not found"
    both = [
        _pod("ft-0-a1-1-y", waiting={"reason": "ErrImagePull", "message": "b"}),
        _pod("ft-0-a1-0-x", scheduled={"reason": "Unschedulable", "message": "a"}),
    ]
    # Whatever order the cache lists them in, the same pod is named (one event, not one per listing).
    assert (
        observe.job_view(job_obj, both).not_starting
        == observe.job_view(job_obj, both[::-1]).not_starting
        == ("pod ft-0-a1-0-x: Unschedulable: a")
    )


def test_a_job_whose_pods_the_api_server_refuses_is_named_from_its_newest_failedcreate_event():
    quota = 'Error creating: pods "ft-0-a1-0-{}" is forbidden: exceeded quota: q, requested: pods=1, limited: pods=0'
    events = [("2026-11-28T00:00:05Z", quota.format("aaaaa")), ("2026-11-28T00:00:09Z", quota.format("bbbbb"))]
    said = observe.refused_pods("ft-0-a1", events)
    # The refused pod's generated name is left out: each retry of one refusal reads the same (one event).
    assert said == observe.refused_pods("ft-0-a1", events[:1])
    assert said == (
        "Job ft-0-a1: FailedCreate: Error creating: pods are forbidden: exceeded quota: q, requested: pods=1, "
        "limited: pods=0"
    )
    assert observe.refused_pods("ft-0-a1", []) == ""
    # The informer's slim Job keeps its creation time, which gates the events read.
    made = {"metadata": {"name": "ft-0-a1", "uid": "u", "creationTimestamp": "2026-11-28T00:00:00Z"}}
    assert observe.slim_job(made)["metadata"]["creationTimestamp"] == "2026-11-28T00:00:00Z"


def test_a_running_attempt_without_pods_is_looked_at_again_soon():
    """Refused pods change no Job and wake no watch: the operator comes back on its own."""
    created = run(ftj())
    assert created.requeue_after == 10.0  # the Job just created
    waiting = run(ftj(created.status), [job(0, 1, start_time="2026-11-28T00:00:01Z")])
    assert waiting.requeue_after == 10.0 and waiting.status["phase"] == "Running"
    running = run(ftj(created.status), [job(0, 1, start_time="2026-11-28T00:00:01Z", pods_left=2)])
    assert running.requeue_after is None


def test_a_job_past_its_deadline_fails_and_stops_its_running_stage_and_wakes_for_it_otherwise():
    """spec.runPolicy.deadlineSeconds: counted from the first stage's start; a plan that leaves the
    job running asks to be looked at again when it passes, however quiet the job is."""
    policy = {"deadlineSeconds": 700}
    first = run(ftj(runPolicy=policy))
    assert first.requeue_after == 10  # the no-pods look comes sooner than the deadline
    running = run(ftj(first.status, runPolicy=policy), [job(0, 1, pods_left=2)], now=LATER)
    assert running.status["phase"] == "Running" and running.requeue_after == 100  # LATER is 600 s on
    over = run(ftj(running.status, runPolicy=policy), [job(0, 1, pods_left=2)], now=MUCH_LATER)
    assert over.status["phase"] == "Failed" and cond(over, "Failed")["reason"] == "DeadlineExceeded"
    assert over.status["message"] == (
        "the job ran past its deadline of 700 s (spec.runPolicy.deadlineSeconds) in stage 0 (head)"
    )
    assert over.delete_jobs == ["ft-0-a1"] and over.create == []  # its pods checkpoint on SIGTERM
    unbounded = run(ftj(first.status), [job(0, 1, pods_left=2)], now=MUCH_LATER)
    assert unbounded.status["phase"] == "Running" and unbounded.requeue_after is None
