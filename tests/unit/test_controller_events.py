"""Which FineTuneJob watch events queue a reconcile (thaw_operator.events.on_finetunejob):
the event predicate, without an API server (the cluster tests run the wiring itself)."""

from __future__ import annotations

import pytest
from thaw_operator import events, state
from thaw_operator.workqueue import SPEC, SWEEP, WorkQueue


@pytest.fixture
def queue(monkeypatch):
    q = WorkQueue()
    monkeypatch.setattr(state, "QUEUE", q)
    monkeypatch.setattr(state, "generations", {})
    monkeypatch.setattr(state, "own_writes", {})
    return q


def event(queue, version: str, generation: int = 1, kind: str = "MODIFIED"):
    body = {"metadata": {"name": "ft", "namespace": "ns", "generation": generation, "resourceVersion": version}}
    events.on_finetunejob(type=kind, body=body, namespace="ns", name="ft")
    got = queue.get(timeout=0)
    if got is not None:
        queue.done(got[0])
    return got and got[2]


def test_the_echo_of_our_own_status_patch_queues_nothing(queue):
    assert event(queue, "10") == SPEC  # new
    state.own_writes[("ns", "ft")] = "11"  # our status patch produced version 11
    assert event(queue, "11") is None  # its echo
    assert event(queue, "12") == SWEEP  # someone else's status or metadata change
    assert event(queue, "13", generation=2) == SPEC  # a spec change


def test_a_spec_change_is_never_taken_for_an_echo(queue):
    event(queue, "10")
    state.own_writes[("ns", "ft")] = "11"
    assert event(queue, "11", generation=2) == SPEC


def test_deleted_forgets_the_key(queue):
    event(queue, "10")
    state.own_writes[("ns", "ft")] = "11"
    assert event(queue, "12", kind="DELETED") is None
    assert ("ns", "ft") not in state.own_writes and ("ns", "ft") not in state.generations


def test_a_stage_pods_change_queues_its_finetunejob_behind_hand_offs(queue):
    """A container stuck waiting (ErrImagePull, a missing Secret) changes no Job: the pod watch
    must wake the operator, or the reason waits for the next full sweep (ten resyncs)."""
    events.on_stage_pod(
        {"metadata": {"name": "ft-0-a1-0-x", "namespace": "ns", "labels": {"thaw.dev/finetunejob": "ft"}}}
    )
    got = queue.get(timeout=0)
    assert got is not None and got[0] == ("ns", "ft") and got[2] == SWEEP
    queue.done(got[0])
    events.on_stage_pod({"metadata": {"name": "stranger", "namespace": "ns", "labels": {}}})
    assert queue.get(timeout=0) is None
